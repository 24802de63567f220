"""A label-map dataset (``DATASETS.LABELMAP_SEMSEG``) through every tool of the loop:
``tools/predict.py`` (probability dump, submission, score), ``tools/ensemble.py --dataset``
(score, label PNGs, dump) and ``tools/pseudo_label.py --dataset``, keyed by the images' paths
relative to the image folder; the pseudo-label split registers with the dataset's classes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from mask2former.data.catalog.pseudo import register_pseudo_label_dataset
from mask2former.engine import build_cfg
from mask2former.inference.prob_dump import ProbDumpReader
from mask2former.inference.sinks import label_png_path
from mask2former.postprocess.confidence import pseudo_label_map

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs/tiny/m2f_swin_tiny_cpu.yaml")
MODEL_OPTS = [
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
    "INPUT.MIN_SIZE_TEST", "48",
    "INPUT.SIZE_DIVISIBILITY", "32",
]  # fmt: skip
KEYS = ["a.png", "b.png"]


def _run(tool, *args, cwd):
    command = [sys.executable, str(REPO / "tools" / tool), *map(str, args)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture
def labelmap_setup(tmp_path):
    cfg = build_cfg(TINY_CONFIG, MODEL_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    classes = [f"c{i}" for i in range(num_classes)]
    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (tmp_path / "lm" / folder).mkdir(parents=True)
    for key in KEYS:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / "lm" / "images" / key
        )
        Image.fromarray(rng.integers(0, num_classes, (48, 64), dtype=np.uint8)).save(
            tmp_path / "lm" / "labels" / key
        )
    entry = [["lm_val", str(tmp_path / "lm/images"), str(tmp_path / "lm/labels"), classes]]
    opts = [*MODEL_OPTS, "DATASETS.TRASH_ROOT", "", "DATASETS.LABELMAP_SEMSEG", json.dumps(entry)]
    yield tmp_path, weights, classes, opts
    for name in list(DatasetCatalog.list()):
        if name.startswith("lm_"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_labelmap_dataset_through_predict_ensemble_and_pseudo_label(labelmap_setup):
    tmp_path, weights, classes, opts = labelmap_setup
    out = tmp_path / "out"
    _run(
        "predict.py", "--config-file", TINY_CONFIG, "--weights", weights, "--dataset", "lm_val",
        "--probs", out / "probs", "--submission", out / "sub.csv", "--score",
        "--score-dir", out / "score", *opts, cwd=tmp_path,
    )  # fmt: skip
    dump = ProbDumpReader(str(out / "probs"))
    assert list(dump.file_names) == KEYS
    with open(out / "sub.csv") as f:
        assert [row[0] for row in list(csv.reader(f))[1:]] == KEYS
    assert (out / "score" / "lb_metrics.json").is_file()

    _run(
        "ensemble.py", "--dumps", out / "probs", "--dataset", "lm_val", "--score",
        "--score-dir", out / "ens_score", "--labels", out / "labels", "--probs", out / "ens",
        "--config-file", TINY_CONFIG, *opts, cwd=tmp_path,
    )  # fmt: skip
    assert list(ProbDumpReader(str(out / "ens")).file_names) == KEYS
    for key in KEYS:
        labels = np.asarray(Image.open(label_png_path(str(out / "labels"), key)))
        np.testing.assert_array_equal(labels, dump.get(key).argmax(0))
    scores = [json.loads((out / d / "lb_metrics.json").read_text()) for d in ("score", "ens_score")]
    # both scored every pixel of both images against the label maps (the dump is float16:
    # a few near-ties may flip, so the matrices need not be equal)
    for score in scores:
        assert [Path(i["file_name"]).name for i in score["per_image"]] == KEYS
        assert np.sum(score["confusion_matrix"]) == len(KEYS) * 48 * 64

    _run(
        "pseudo_label.py", "--dumps", out / "probs", "--dataset", "lm_val", "--threshold", "0",
        "--output", out / "pseudo", "--config-file", TINY_CONFIG, *opts, cwd=tmp_path,
    )  # fmt: skip
    register_pseudo_label_dataset(
        "lm_pseudo", str(out / "pseudo" / "pseudo.json"), str(tmp_path / "lm/images")
    )
    assert MetadataCatalog.get("lm_pseudo").stuff_classes == classes  # no Background added
    records = DatasetCatalog.get("lm_pseudo")
    assert [Path(r["file_name"]).name for r in records] == KEYS
    for record in records:
        expected = pseudo_label_map(dump.get(Path(record["file_name"]).name), 0.0)
        np.testing.assert_array_equal(np.asarray(Image.open(record["sem_seg_file_name"])), expected)
