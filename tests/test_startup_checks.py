"""Start-up checks of train_net.py: a NUM_CLASSES that differs from the training data's class
count, training data without annotations and a crop larger than every image are reported with
the numbers (errors / one warning) instead of training silently on wrong targets."""

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.data import MetadataCatalog

from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import get_project_cfg
from mask2former.engine.checks import (
    check_crop_size,
    check_num_classes,
    check_training_annotations,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
SIZE = 64
TRAIN = [
    "MODEL.DEVICE",
    "cpu",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "INPUT.MIN_SIZE_TRAIN",
    f"({SIZE},)",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
    "TEST.EVAL_PERIOD",
    "0",
    "SOLVER.MAX_ITER",
    "1",
    "SOLVER.CHECKPOINT_PERIOD",
    "100",
]


@contextlib.contextmanager
def captured_warnings():
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("mask2former.engine.checks")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------ in process
def test_num_classes_must_match_the_dataset():
    MetadataCatalog.get("checks_eleven").set(stuff_classes=[f"c{i}" for i in range(11)])
    check_num_classes(11, ["checks_eleven"])
    for wrong in (5, 20):
        with pytest.raises(ValueError) as e:
            check_num_classes(wrong, ["checks_eleven"])
        assert f"NUM_CLASSES is {wrong} but dataset 'checks_eleven' has 11 classes" in str(e.value)


def record(annotations=0, label_file=None, size=(64, 64)):
    r = {
        "file_name": "x.jpg",
        "height": size[0],
        "width": size[1],
        "annotations": [{"category_id": 1}] * annotations,
    }
    if label_file:
        r["sem_seg_file_name"] = label_file
    return r


def test_records_without_annotations_are_counted():
    records = {"checks_a": [record(2), record(0), record(0), record(label_file="l.png")]}
    with captured_warnings() as warnings:
        check_training_annotations(records)
    assert [w.getMessage().split(" training")[0] for w in warnings] == ["2 of 4"]
    with pytest.raises(ValueError, match="None of the 3 training images"):
        check_training_annotations({"checks_a": [record(0)] * 2, "checks_b": [record(0)]})


def crop_cfg(crop, min_size=SIZE, max_size=1333):
    cfg = get_project_cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = crop
    cfg.INPUT.MIN_SIZE_TRAIN = (min_size // 2, min_size)
    cfg.INPUT.MAX_SIZE_TRAIN = max_size
    return cfg


def test_crop_larger_than_every_image_warns_once():
    records = [record(1, size=(64, 64)), record(1, size=(48, 64)), record(1, size=(64, 96))]
    with captured_warnings() as warnings:
        assert check_crop_size(crop_cfg((128, 128)), records)
        # fits once resized (short side up to 128), or fits the largest image
        assert not check_crop_size(crop_cfg((128, 128), min_size=128), records)
        assert not check_crop_size(crop_cfg((64, 96)), records)
        # the long-side cap keeps the images small
        assert check_crop_size(crop_cfg((100, 100), min_size=128, max_size=96), records)
    assert len(warnings) == 2
    message = warnings[0].getMessage()
    assert "INPUT.CROP.SIZE (128, 128) is larger than every one of the 3 training images" in message
    assert "the largest is 64x96" in message


# ------------------------------------------------------------------------------ train_net.py
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup_checks") / "data"
    generate_synthetic_trash(str(root), num_train=4, num_val=2, num_test=1, image_size=SIZE, seed=0)
    return root


def train(data_root, tmp_path, *opts, ok):
    cmd = [
        sys.executable,
        str(ROOT / "train_net.py"),
        "--config-file",
        str(CONFIG),
        "--num-gpus",
        "1",
        *TRAIN,
        "DATASETS.TRASH_ROOT",
        str(data_root),
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        *map(str, opts),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, check=False, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, output[-4000:]
    return output


def test_train_net_refuses_a_num_classes_that_differs_from_the_data(data_root, tmp_path):
    output = train(
        data_root,
        tmp_path,
        "INPUT.CROP.SIZE",
        f"({SIZE}, {SIZE})",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        5,
        ok=False,
    )
    assert (
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES is 5 but dataset 'trash_train' "
        f"({data_root / 'train.json'}) has 11 classes"
    ) in output


def test_train_net_refuses_training_data_without_annotations(data_root, tmp_path):
    # the same images and splits, but a train.json without annotations
    split = json.loads((data_root / "train.json").read_text())
    split["annotations"] = []
    unannotated = tmp_path / "no_annotations"
    unannotated.mkdir()
    for name in os.listdir(data_root):
        if name != "train.json":
            os.symlink(data_root / name, unannotated / name)
    (unannotated / "train.json").write_text(json.dumps(split))
    output = train(unannotated, tmp_path, "INPUT.CROP.SIZE", f"({SIZE}, {SIZE})", ok=False)
    assert "None of the 4 training images of dataset 'trash_train'" in output
    assert "4 of 4 training images of dataset 'trash_train'" in output


def test_train_net_warns_once_about_a_crop_larger_than_every_image(data_root, tmp_path):
    output = train(data_root, tmp_path, "INPUT.CROP.SIZE", "(96, 96)", ok=True)
    assert output.count("INPUT.CROP.SIZE (96, 96) is larger than every one of the 4 training") == 1
