"""Tests of the MaskFormer meta-architecture and MaskFormerHead: with a tiny stand-in backbone and
pixel decoder, and end to end from the tiny config with the real Swin and MSDeformAttn decoder."""

import io
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model as build_detectron2_model
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import BitMasks, Instances
from torch import nn
from torch.nn import functional as F

from mask2former.config import add_maskformer2_config
from mask2former.modeling.backbone import swin  # noqa: F401  (registers D2SwinTransformer)
from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.matcher import HungarianMatcher
from mask2former.modeling.meta_arch import (
    MaskFormer,
    MaskFormerHead,
    resized_semantic_inference,
    semantic_inference_naive,
)
from mask2former.modeling.pixel_decoder import msdeformattn  # noqa: F401  (registers the decoder)
from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

NUM_CLASSES = 4  # background + 3 shapes
HIDDEN, QUERIES, MASK_DIM, CONV_DIM = 32, 8, 32, 32
DEC_LAYERS = 3  # config value: 2 decoder blocks + the prediction of the learnable queries
TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs/tiny/m2f_swin_tiny_cpu.yaml")
NUM_CLASSES_TRASH = 11


class TinyBackbone(Backbone):
    """Strided convolutions giving res2..res5 (strides 4..32)."""

    def __init__(self, channels=(16, 24, 32, 32)):
        super().__init__()
        c2, c3, c4, c5 = channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())
            for cin, cout in ((c2, c3), (c3, c4), (c4, c5))
        )
        self._shapes = {
            f"res{i + 2}": ShapeSpec(channels=c, stride=4 * 2**i) for i, c in enumerate(channels)
        }

    @property
    def size_divisibility(self):
        return 32

    def forward(self, x):
        out = {"res2": self.stem(x)}
        for i, stage in enumerate(self.stages):
            out[f"res{i + 3}"] = stage(out[f"res{i + 2}"])
        return out

    def output_shape(self):
        return dict(self._shapes)


class TinyPixelDecoder(nn.Module):
    """FPN-like stand-in with the pixel decoder interface (forward_features)."""

    def __init__(self, input_shape, conv_dim=CONV_DIM, mask_dim=MASK_DIM):
        super().__init__()
        self.lateral = nn.ModuleDict(
            {k: nn.Conv2d(v.channels, conv_dim, 1) for k, v in input_shape.items()}
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward_features(self, features):
        maps = {}
        previous = None
        for name in ("res5", "res4", "res3", "res2"):
            x = self.lateral[name](features[name])
            if previous is not None:
                x = x + F.interpolate(previous, size=x.shape[-2:], mode="nearest")
            maps[name] = previous = F.relu(x)
        multi_scale = [maps["res5"], maps["res4"], maps["res3"]]
        return self.mask_features(maps["res2"]), None, multi_scale


def build_model(seed=0, num_points=256, size_divisibility=32, before_inference=False):
    torch.manual_seed(seed)
    backbone = TinyBackbone()
    predictor = MultiScaleMaskedTransformerDecoder(
        CONV_DIM,
        num_classes=NUM_CLASSES,
        hidden_dim=HIDDEN,
        num_queries=QUERIES,
        nheads=4,
        dim_feedforward=64,
        dec_layers=DEC_LAYERS - 1,
        pre_norm=False,
        mask_dim=MASK_DIM,
        enforce_input_project=False,
    )
    head = MaskFormerHead(
        backbone.output_shape(),
        num_classes=NUM_CLASSES,
        pixel_decoder=TinyPixelDecoder(backbone.output_shape()),
        transformer_predictor=predictor,
    )
    weight_dict = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    main_weights = list(weight_dict.items())
    weight_dict.update({f"{k}_{i}": v for i in range(DEC_LAYERS - 1) for k, v in main_weights})
    criterion = SetCriterion(
        NUM_CLASSES,
        matcher=HungarianMatcher(2.0, 5.0, 5.0, num_points=num_points),
        weight_dict=weight_dict,
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    return MaskFormer(
        backbone=backbone,
        sem_seg_head=head,
        criterion=criterion,
        num_queries=QUERIES,
        size_divisibility=size_divisibility,
        sem_seg_postprocess_before_inference=before_inference,
        pixel_mean=[128.0, 128.0, 128.0],
        pixel_std=[64.0, 64.0, 64.0],
    )


def synthetic_sample(seed, size=64):
    """A noisy background with a red square (1), a green disk (2) and a blue bar (3)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(60, 140, (3, size, size), generator=g).float()
    label = torch.zeros(size, size, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    colors = {1: (230, 30, 30), 2: (30, 220, 40), 3: (40, 50, 230)}
    for cls in (1, 2, 3):
        cy, cx = torch.randint(12, size - 12, (2,), generator=g).tolist()
        if cls == 1:
            region = ((yy - cy).abs() <= 8) & ((xx - cx).abs() <= 8)
        elif cls == 2:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= 81
        else:
            region = ((yy - cy).abs() <= 3) & ((xx - cx).abs() <= 11)
        label[region] = cls
        for c in range(3):
            image[c][region] = colors[cls][c]
    image = (image + torch.randn(3, size, size, generator=g) * 8).clamp(0, 255).to(torch.uint8)
    return image, label


def training_input(image, label):
    classes = [c for c in range(NUM_CLASSES) if (label == c).any()]
    instances = Instances(tuple(label.shape))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    instances.gt_masks = torch.stack([label == c for c in classes])
    return {
        "image": image,
        "sem_seg": label,
        "instances": instances,
        "height": label.shape[0],
        "width": label.shape[1],
    }


def crop_sample(sample, height, width):
    """The top-left ``height`` x ``width`` part of a training input."""
    return training_input(sample["image"][:, :height, :width], sample["sem_seg"][:height, :width])


def mean_iou(predictions, labels):
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for pred, gt in zip(predictions, labels):
        confusion += torch.bincount(
            gt.flatten() * NUM_CLASSES + pred.flatten(), minlength=NUM_CLASSES**2
        ).view(NUM_CLASSES, NUM_CLASSES)
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    return (tp / union)[union > 0].mean().item()


def official_semantic_inference(mask_cls, mask_pred, padded_size, image_size, output_size, before):
    """The official procedure in float64: upsample to the padded size, then either combine and
    postprocess the scores, or postprocess the masks and combine."""
    up = F.interpolate(
        mask_pred[None].double(), size=padded_size, mode="bilinear", align_corners=False
    )[0]
    height, width = output_size
    if before:
        up = sem_seg_postprocess(up, image_size, height, width)
        return semantic_inference_naive(mask_cls.double(), up)
    scores = semantic_inference_naive(mask_cls.double(), up)
    return sem_seg_postprocess(scores, image_size, height, width)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize(
    "image_size, output_size",
    [((64, 64), (64, 64)), ((50, 37), (50, 37)), ((50, 37), (75, 55)), ((50, 37), (23, 41))],
)
def test_semantic_inference_equals_official_definition(before, image_size, output_size):
    model = build_model(before_inference=before)
    g = torch.Generator().manual_seed(0)
    mask_cls = torch.randn(QUERIES, NUM_CLASSES + 1, generator=g) * 3
    mask_pred = torch.randn(QUERIES, 16, 16, generator=g) * 4
    got = model.semantic_inference(mask_cls, mask_pred, (64, 64), image_size, output_size)
    expected = official_semantic_inference(
        mask_cls, mask_pred, (64, 64), image_size, output_size, before
    )
    assert got.dtype == torch.float32 and got.shape == (NUM_CLASSES, *output_size)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("resize_masks_first", [False, True])
def test_semantic_inference_bands_do_not_change_the_result(resize_masks_first):
    """Bands of one output row give the same scores as one band for the whole image."""
    g = torch.Generator().manual_seed(1)
    mask_cls = torch.randn(QUERIES, NUM_CLASSES + 1, generator=g)
    mask_pred = torch.randn(QUERIES, 16, 16, generator=g)
    args = (mask_cls, mask_pred, (64, 64), (61, 57), (70, 50), resize_masks_first)
    whole = resized_semantic_inference(*args, band_elements=10**9)
    one_row = resized_semantic_inference(*args, band_elements=1)
    torch.testing.assert_close(one_row, whole, rtol=0, atol=1e-6)


def test_inference_shapes_and_values_for_a_batch_of_different_sizes():
    model = build_model().eval()
    images = [
        torch.randint(0, 255, (3, 50, 37), dtype=torch.uint8),
        torch.randint(0, 255, (3, 33, 70), dtype=torch.uint8),
    ]
    inputs = [
        {"image": images[0], "height": 100, "width": 74},
        {"image": images[1]},  # no requested size: the input size
    ]
    with torch.no_grad():
        results = model(inputs)
        padded = model.preprocess_image(inputs)
        outputs = model.sem_seg_head(model.backbone(padded.tensor))
    assert padded.tensor.shape[-2:] == (64, 96)
    assert [r["sem_seg"].shape for r in results] == [(NUM_CLASSES, 100, 74), (NUM_CLASSES, 33, 70)]
    for i, (image_size, output_size) in enumerate([((50, 37), (100, 74)), ((33, 70), (33, 70))]):
        expected = official_semantic_inference(
            outputs["pred_logits"][i],
            outputs["pred_masks"][i],
            (64, 96),
            image_size,
            output_size,
            before=False,
        )
        torch.testing.assert_close(results[i]["sem_seg"].double(), expected, rtol=0, atol=2e-6)


def test_size_divisibility_falls_back_to_backbone():
    assert build_model(size_divisibility=-1).size_divisibility == 32
    assert build_model(size_divisibility=64).size_divisibility == 64


def test_prepare_targets_pads_masks_tensor_and_bitmasks():
    model = build_model()
    image, label = synthetic_sample(0, size=40)
    sample = training_input(image, label)
    images = model.preprocess_image([sample])
    assert images.tensor.shape[-2:] == (64, 64)
    for masks in (sample["instances"].gt_masks, BitMasks(sample["instances"].gt_masks)):
        sample["instances"].gt_masks = masks
        (target,) = model.prepare_targets([sample["instances"]], images)
        assert target["masks"].shape == (len(target["labels"]), 64, 64)
        expected = torch.stack([label == c for c in target["labels"]])
        assert torch.equal(target["masks"][:, :40, :40], expected)
        assert not target["masks"][:, 40:].any() and not target["masks"][:, :, 40:].any()


def test_training_losses_are_weighted_and_complete():
    model = build_model().train()
    samples = [training_input(*synthetic_sample(i, size=48)) for i in range(2)]
    samples[1] = crop_sample(samples[1], 40, 45)  # different sizes in one batch
    torch.manual_seed(0)
    losses = model(samples)
    assert set(losses) == set(model.criterion.weight_dict)
    assert len(losses) == 3 * DEC_LAYERS
    # weights applied: compare with the unweighted criterion on the same predictions
    torch.manual_seed(0)
    images = model.preprocess_image(samples)
    outputs = model.sem_seg_head(model.backbone(images.tensor))
    targets = model.prepare_targets([s["instances"] for s in samples], images)
    raw = model.criterion(outputs, targets)
    for k, v in losses.items():
        assert v.item() == pytest.approx(raw[k].item() * model.criterion.weight_dict[k], rel=1e-5)


def test_training_and_inference_under_autocast():
    """Mixed precision (bf16 autocast on CPU stands in for fp16 on GPU): float32 losses and
    scores, gradients reach the parameters."""
    model = build_model().train()
    samples = [training_input(*synthetic_sample(i, size=48)) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(samples)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.query_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        result = model([{"image": samples[0]["image"]}])[0]["sem_seg"]
    assert result.dtype == torch.float32 and result.shape == (NUM_CLASSES, 48, 48)


def test_tiny_model_overfits_synthetic_images():
    torch.manual_seed(0)
    samples = [training_input(*synthetic_sample(i)) for i in range(4)]
    labels = [s["sem_seg"] for s in samples]
    model = build_model(num_points=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)

    def evaluate():
        model.eval()
        with torch.no_grad():
            results = model([{"image": s["image"]} for s in samples])
        model.train()
        return mean_iou([r["sem_seg"].argmax(0) for r in results], labels)

    background_only = mean_iou([torch.zeros_like(label) for label in labels], labels)
    initial_miou = evaluate()
    losses = []
    model.train()
    for _ in range(70):
        loss = sum(model(samples).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final_miou = evaluate()
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert background_only < 0.25
    assert final_miou > 0.75, (initial_miou, final_miou)


def test_state_dict_round_trip_gives_identical_outputs():
    model = build_model(seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = build_model(seed=1).eval()
    inputs = [{"image": torch.randint(0, 255, (3, 45, 52), dtype=torch.uint8)}]
    with torch.no_grad():
        before_load = restored(inputs)[0]["sem_seg"]
        restored.load_state_dict(torch.load(buffer))
        expected = model(inputs)[0]["sem_seg"]
        got = restored(inputs)[0]["sem_seg"]
    assert not torch.equal(before_load, expected)
    assert torch.equal(got, expected)
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    assert any(k.startswith("sem_seg_head.pixel_decoder.") for k in model.state_dict())
    assert any(k.startswith("sem_seg_head.predictor.query_feat") for k in model.state_dict())


def test_head_rejects_unsupported_transformer_in_feature():
    backbone = TinyBackbone()
    with pytest.raises(ValueError):
        MaskFormerHead(
            backbone.output_shape(),
            num_classes=NUM_CLASSES,
            pixel_decoder=TinyPixelDecoder(backbone.output_shape()),
            transformer_predictor=nn.Identity(),
            transformer_in_feature="res5",
        )


def tiny_swin_cfg():
    """The tiny CPU config (real Swin backbone and MSDeformAttn pixel decoder), made smaller."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 1
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 8
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 256
    # the pixel decoder requires its heads to equal MASK_FORMER.NHEADS (the official coupling)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = cfg.MODEL.MASK_FORMER.NHEADS
    return cfg


def test_end_to_end_from_config_with_swin_and_msdeformattn():
    cfg = tiny_swin_cfg()
    torch.manual_seed(0)
    model = build_detectron2_model(cfg)
    assert isinstance(model, MaskFormer)
    assert isinstance(model.sem_seg_head, MaskFormerHead)
    assert model.sem_seg_head.predictor.num_layers == 2
    keys = list(model.state_dict())
    for prefix in ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.query_feat"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert set(model.criterion.weight_dict) == {
        f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")
    }

    samples = [
        training_input(*synthetic_sample(0, size=64)),
        crop_sample(training_input(*synthetic_sample(1, size=48)), 48, 37),
    ]
    model.train()
    losses = model(samples)
    assert set(losses) == set(model.criterion.weight_dict)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.sem_seg_head.predictor.query_feat.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad is not None

    model.eval()
    inputs = [
        {"image": samples[0]["image"], "height": 96, "width": 96},
        {"image": samples[1]["image"]},
    ]
    with torch.no_grad():
        results = model(inputs)
        images = model.preprocess_image(inputs)
        outputs = model.sem_seg_head(model.backbone(images.tensor))
    shapes = [r["sem_seg"].shape for r in results]
    assert shapes == [(NUM_CLASSES_TRASH, 96, 96), (NUM_CLASSES_TRASH, 48, 37)]
    for i, (image_size, output_size) in enumerate([((64, 64), (96, 96)), ((48, 37), (48, 37))]):
        expected = official_semantic_inference(
            outputs["pred_logits"][i],
            outputs["pred_masks"][i],
            tuple(images.tensor.shape[-2:]),
            image_size,
            output_size,
            before=False,
        )
        torch.testing.assert_close(results[i]["sem_seg"].double(), expected, rtol=0, atol=2e-6)
