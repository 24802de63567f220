"""An image that fails to decode (truncated JPEG, registration without VERIFY_IMAGES) through
the real train loader with a worker process: "error" stops naming the file, "skip" warns once
with the file and the count and trains on the other images; inference reads name the file."""

import logging
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from mask2former.data.augmentation.copy_paste import generate_bank
from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from mask2former.data.catalog import register_trash_dataset
from mask2former.data.coco.images import UnreadableImageError, read_image_file
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import Trainer, get_project_cfg

PREFIX = "unreadable"


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("unreadable") / "data"
    generate_synthetic_trash(str(root), num_train=2, num_val=1, num_test=1, image_size=32, seed=0)
    register_trash_dataset(str(root), prefix=PREFIX)  # VERIFY_IMAGES is off by default
    records = DatasetCatalog.get(f"{PREFIX}_train")
    bad = records[0]["file_name"]
    assert bad.endswith(".jpg")
    truncate(bad)
    yield bad
    for name in list(DatasetCatalog.list()):
        if name.startswith(PREFIX + "_"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def loader_cfg(policy):
    cfg = get_project_cfg()
    cfg.DATASETS.TRAIN = (f"{PREFIX}_train",)
    cfg.DATASETS.VALIDATION.UNREADABLE_IMAGE = policy
    cfg.DATALOADER.NUM_WORKERS = 1
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    return cfg


def test_default_policy_is_error():
    assert get_project_cfg().DATASETS.VALIDATION.UNREADABLE_IMAGE == "error"


def test_error_policy_names_the_file(dataset):
    loader = Trainer.build_train_loader(loader_cfg("error"))
    with pytest.raises(Exception, match="cannot decode the image") as info:
        for _ in zip(range(4), loader):  # 4 batches of 4 from 2 images: the bad one is drawn
            pass
    assert dataset in str(info.value)
    assert "truncated" in str(info.value)


def test_skip_policy_warns_once_and_draws_other_images(dataset, tmp_path):
    # The worker process is forked after this handler is attached: it writes to the same file.
    log_file = tmp_path / "mapper.log"
    handler = logging.FileHandler(log_file)
    mapper_logger = logging.getLogger("mask2former.data.augmentation.mapper")
    mapper_logger.addHandler(handler)
    cfg = loader_cfg("skip")
    try:
        # The trainer's loader: its mapper draws replacements from a sample of the records, so
        # even an unreadable first image is replaced.
        loader = Trainer.build_train_loader(cfg)
        batches = [b for _, b in zip(range(4), loader)]
    finally:
        mapper_logger.removeHandler(handler)
        handler.close()
    good = {d["file_name"] for b in batches for d in b}
    assert len(good) == 1 and dataset not in good
    assert all(len(b) == 4 for b in batches)
    warnings = [line for line in log_file.read_text().splitlines() if dataset in line]
    assert len(warnings) == 1, warnings  # once per file, though drawn several times
    assert "1 unreadable image(s) skipped" in warnings[0]


def test_skip_without_fallback_records_uses_the_images_read_before(dataset, tmp_path):
    cfg = loader_cfg("skip")
    mapper = MaskFormerSemanticDatasetMapper(cfg, True)
    good, bad = sorted(
        DatasetCatalog.get(f"{PREFIX}_train"), key=lambda r: r["file_name"] == dataset
    )
    with pytest.raises(UnreadableImageError, match="no readable image to draw instead"):
        mapper(bad)  # nothing read before
    assert mapper(good)["file_name"] == good["file_name"]
    assert mapper(bad)["file_name"] == good["file_name"]


def test_bad_policy_value_is_refused(dataset):
    with pytest.raises(ValueError, match="unreadable_image must be"):
        Trainer.build_train_loader(loader_cfg("fix"))


def test_read_image_file_names_the_file(tmp_path):
    path = tmp_path / "random.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(UnreadableImageError, match=str(path)):
        read_image_file(str(path), "RGB")
    with pytest.raises(FileNotFoundError):
        read_image_file(os.path.join(str(tmp_path), "none.jpg"), "RGB")


def test_copy_paste_bank_names_an_unreadable_image(dataset, tmp_path):
    records = DatasetCatalog.get(f"{PREFIX}_train")
    bank = tmp_path / "bank"
    with pytest.raises(UnreadableImageError, match="cannot decode the image") as info:
        generate_bank(records, str(bank), 6, seed=0)  # every image is drawn as target / source
    assert info.value.path == dataset
    assert not [n for n in os.listdir(bank) if not n.startswith(".")]  # no bank version
