"""Train mapper: shapes, padding with ignore, instance "
"masks, crop constraint, flip, copy-paste seam."""

import random

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.point_rend import ColorAugSSDTransform
from PIL import Image

from mask2former.config import add_maskformer2_config
from mask2former.data.augmentation.color import ColorAugSSDLookupTransform
from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from mask2former.data.augmentation.resize_crop import ResizeShortestEdgeCrop

H, W = 40, 50
RED, BLUE, GREY = (250, 10, 10), (10, 10, 250), (120, 120, 120)


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def record(tmp_path):
    """A 50x40 image: red block (class 3) at x 5..20, blue block (class 7) at x 30..45."""
    img = np.full((H, W, 3), GREY, dtype=np.uint8)
    img[10:30, 5:20] = RED
    img[5:35, 30:45] = BLUE
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    return {
        "file_name": str(path),
        "height": H,
        "width": W,
        "image_id": 7,
        "annotations": [
            {"segmentation": rect(5, 10, 20, 30), "category_id": 3, "iscrowd": 0},
            {"segmentation": rect(30, 5, 45, 35), "category_id": 7, "iscrowd": 0},
        ],
    }


def make_mapper(augmentations=(), size_divisibility=-1, **kwargs):
    return MaskFormerSemanticDatasetMapper(
        True,
        augmentations=list(augmentations),
        image_format="RGB",
        ignore_label=255,
        size_divisibility=size_divisibility,
        **kwargs,
    )


def check_instances(out, ignore=255):
    sem_seg, inst = out["sem_seg"], out["instances"]
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    assert inst.gt_masks.shape == (len(inst.gt_classes),) + tuple(sem_seg.shape)
    assert set(inst.gt_classes.tolist()) == set(torch.unique(sem_seg).tolist()) - {ignore}
    for cls, mask in zip(inst.gt_classes, inst.gt_masks):
        assert torch.equal(mask, sem_seg == cls)


def test_outputs(record):
    out = make_mapper()(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, H, W)
    assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == (H, W)
    assert (out["height"], out["width"], out["image_id"]) == (H, W, 7) and out[
        "file_name"
    ] == record["file_name"]
    assert "annotations" not in out and record["annotations"]  # the input record is not modified
    sem_seg, image = out["sem_seg"].numpy(), out["image"].permute(1, 2, 0).numpy()
    assert (image[sem_seg == 3] == RED).all() and (image[sem_seg == 7] == BLUE).all()
    assert (image[sem_seg == 0] == GREY).all()
    assert out["instances"].gt_classes.tolist() == [0, 3, 7]
    check_instances(out)


def test_padding_uses_ignore_label_and_128(record):
    out = make_mapper(size_divisibility=32)(record)
    assert out["image"].shape == (3, 64, 64) and out["sem_seg"].shape == (64, 64)
    assert (out["sem_seg"][H:] == 255).all() and (out["sem_seg"][:, W:] == 255).all()
    assert (out["image"][:, H:] == 128).all() and (out["image"][:, :, W:] == 128).all()
    assert (out["sem_seg"][:H, :W] != 255).all()
    assert 255 not in out["instances"].gt_classes.tolist()
    check_instances(out)


def test_label_map_record_with_ignore(record, tmp_path):
    label = np.zeros((H, W), dtype=np.uint8)
    label[:, :10] = 2
    label[0:5] = 255
    Image.fromarray(label).save(tmp_path / "label.png")
    rec = {k: v for k, v in record.items() if k != "annotations"}
    rec["sem_seg_file_name"] = str(tmp_path / "label.png")
    out = make_mapper()(rec)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), label)
    assert out["instances"].gt_classes.tolist() == [0, 2] and "sem_seg_file_name" not in out
    check_instances(out)


def test_flip_keeps_image_and_target_aligned(record):
    plain = make_mapper()(record)
    flipped = make_mapper([T.RandomFlip(prob=1.0)])(record)
    assert torch.equal(flipped["sem_seg"], plain["sem_seg"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    image = flipped["image"].permute(1, 2, 0).numpy()
    assert (image[flipped["sem_seg"].numpy() == 3] == RED).all()


def test_resize_keeps_alignment(record):
    out = make_mapper([T.ResizeShortestEdge([80], 1000, "choice")])(record)
    assert out["sem_seg"].shape == (80, 100) and out["image"].shape == (3, 80, 100)
    image, sem_seg = out["image"].permute(1, 2, 0).numpy().astype(int), out["sem_seg"].numpy()
    inner = (sem_seg == 3) & (np.abs(image - RED).sum(-1) < 60)
    assert inner.sum() > 0.8 * (sem_seg == 3).sum()  # bilinear edges aside


def test_crop_category_area_constraint(tmp_path):
    # Left 40 columns class 1, right 24 columns class 2; 32x32 crops: a crop is valid (no class
    # covering 75% or more) when 17 <= x0 <= 31, i.e. for 15 of the 33 positions.
    Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    rec = {
        "file_name": str(tmp_path / "img.png"),
        "height": 32,
        "width": 64,
        "image_id": 0,
        "annotations": [
            {"segmentation": rect(0, 0, 40, 32), "category_id": 1},
            {"segmentation": rect(40, 0, 64, 32), "category_id": 2},
        ],
    }

    def max_fraction(max_area, seed):
        np.random.seed(seed)
        crop = T.RandomCrop_CategoryAreaConstraint("absolute", (32, 32), max_area, 255)
        sem_seg = make_mapper([crop])(rec)["sem_seg"]
        assert sem_seg.shape == (32, 32)
        return torch.bincount(sem_seg.flatten()).max().item() / sem_seg.numel()

    constrained = [max_fraction(0.75, seed) for seed in range(30)]
    unconstrained = [max_fraction(1.0, seed) for seed in range(30)]
    assert sum(f < 0.75 for f in constrained) >= 29  # 10 tries each: a rare failure allowed
    assert sum(f >= 0.75 for f in unconstrained) >= 10


def augmentation_cfg(min_sizes, max_size, sampling, crop, max_area, size_divisibility):
    """A config with the train mapper's augmentation keys: multi-scale resize, absolute crop
    with the category-area constraint, SSD colour jitter, RGB."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = min_sizes
    cfg.INPUT.MAX_SIZE_TRAIN = max_size
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = sampling
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = crop
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = max_area
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = size_divisibility
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def test_from_config(record):
    cfg = augmentation_cfg((32, 48), 200, "choice", (24, 24), 0.9, 32)
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    cfg.DATASETS.POLYGON_DRAW_ORDER = "file"
    mapper = MaskFormerSemanticDatasetMapper(cfg, True)
    augs = mapper.augmentations.augs
    # resize and crop as one augmentation with Detectron2's two inside (same draws)
    assert isinstance(augs[0], ResizeShortestEdgeCrop)
    resize, crop = augs[0].resize, augs[0].crop
    assert isinstance(resize, T.ResizeShortestEdge) and resize.short_edge_length == (32, 48)
    assert isinstance(crop, T.RandomCrop_CategoryAreaConstraint)
    assert crop.single_category_max_area == 0.9 and crop.ignored_category == 254
    # the lookup-table colour jitter (same bytes as ColorAugSSDTransform, which it extends)
    assert any(isinstance(getattr(a, "tfm", a), ColorAugSSDLookupTransform) for a in augs)
    assert all(isinstance(getattr(a, "tfm", a), ColorAugSSDTransform) for a in augs[1:-1])
    assert isinstance(augs[-1], T.RandomFlip)
    assert (mapper.ignore_label, mapper.size_divisibility, mapper.draw_order) == (254, 32, "file")
    np.random.seed(0)
    out = mapper(record)
    assert out["image"].shape == (3, 32, 32) and (out["sem_seg"][24:] == 254).all()
    check_instances(out, ignore=254)
    with pytest.raises(ValueError, match="DatasetMapper"):
        MaskFormerSemanticDatasetMapper(cfg, False)


def test_config_mapper_maps_as_detectron2s_augmentations(record):
    """The config's mapper (fused resize + crop, lookup-table colour jitter) against the same
    recipe as Detectron2's four augmentations applied one after the other: equal labels and
    masks, images within the bilinear coefficients' rounding, the same random draws."""
    cfg = augmentation_cfg((30, 90), 400, "range", (32, 32), 0.8, -1)
    mapper = MaskFormerSemanticDatasetMapper(cfg, True)
    detectron2_augs = [
        T.ResizeShortestEdge((30, 90), 400, "range"),
        T.RandomCrop_CategoryAreaConstraint("absolute", (32, 32), 0.8, 255),
        ColorAugSSDTransform("RGB"),
        T.RandomFlip(),
    ]
    reference = make_mapper(detectron2_augs)
    for seed in range(20):
        outputs = []
        for m in (reference, mapper):
            np.random.seed(seed)
            random.seed(seed)
            outputs.append((m(record), np.random.rand(), random.random()))
        (ref, *ref_next), (out, *out_next) = outputs
        assert out_next == ref_next
        assert torch.equal(out["sem_seg"], ref["sem_seg"])
        assert torch.equal(out["instances"].gt_masks, ref["instances"].gt_masks)
        assert torch.equal(out["instances"].gt_classes, ref["instances"].gt_classes)
        assert out["image"].shape == ref["image"].shape
        assert (out["image"].int() - ref["image"].int()).abs().max() <= 2


class SwapToOther:
    """A copy-paste stand-in that substitutes another record."""

    def __init__(self, other):
        self.other = other
        self.rngs = []

    def maybe_sample(self, record, rng):
        self.rngs.append(rng)
        return dict(self.other)


def test_copy_paste_seam(record, tmp_path):
    Image.fromarray(np.full((20, 30, 3), 60, dtype=np.uint8)).save(tmp_path / "other.png")
    other = {
        "file_name": str(tmp_path / "other.png"),
        "height": 20,
        "width": 30,
        "image_id": "bank_0",
        "annotations": [{"segmentation": rect(0, 0, 10, 10), "category_id": 5}],
    }
    sampler = SwapToOther(other)
    mapper = make_mapper(copy_paste=sampler)
    out = mapper(record)
    assert out["image_id"] == "bank_0" and out["sem_seg"].shape == (20, 30)
    assert out["instances"].gt_classes.tolist() == [0, 5]
    mapper(record)
    assert isinstance(sampler.rngs[0], np.random.Generator) and sampler.rngs[0] is sampler.rngs[1]
