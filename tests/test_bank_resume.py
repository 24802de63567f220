"""train_net.py end to end (tiny Swin, synthetic data): the copy-paste bank weighted by the IoUs of
the configured one of two test datasets, --resume continuing the bank sequence, and a changed
SOLVER.BASE_LR honoured after --resume (read from the logged lr)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mask2former.data.catalog import TRASH_CLASSES
from mask2former.data.offline.synthetic import generate_synthetic_trash

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
SIZE = 64
OLD_LR, NEW_LR = 1e-3, 1e-2

OPTS = [
    "MODEL.DEVICE", "cpu",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.CONFUSION_MATRIX_PLOT", "False",
    "INPUT.MIN_SIZE_TEST", str(SIZE),
    "INPUT.SIZE_DIVISIBILITY", str(SIZE),
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "INPUT.MIN_SIZE_TRAIN", f"({SIZE},)",
    "INPUT.CROP.SIZE", f"({SIZE}, {SIZE})",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "DATASETS.TEST", "('trash_val', 'trash_train')",
    "INPUT.COPY_PASTE.ENABLED", "True",
    "INPUT.COPY_PASTE.BANK_SIZE", "2",
    "INPUT.COPY_PASTE.IOU_DATASET", "trash_train",  # not the first test dataset
    "TEST.EVAL_PERIOD", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100",
]  # fmt: skip


def _train(out, data, *extra, resume=False):
    cmd = [sys.executable, str(ROOT / "train_net.py"), "--config-file", str(CONFIG)]
    cmd += ["--resume"] if resume else []
    cmd += [*OPTS, "DATASETS.TRASH_ROOT", str(data), "OUTPUT_DIR", str(out), *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(out.parent), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _metrics(out):
    lines = (out / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _iou_line(lines, iteration, dataset):
    """Per-label IoUs of ``dataset`` evaluated at ``iteration`` (as written to metrics.json)."""
    (line,) = [m for m in lines if m["iteration"] == iteration and f"{dataset}/sem_seg/mIoU" in m]
    return {
        label: line[f"{dataset}/sem_seg/IoU-{name}"]
        for label, name in enumerate(TRASH_CLASSES)
        if f"{dataset}/sem_seg/IoU-{name}" in line
    }


def _final_iou(out, dataset):
    """Per-label IoUs of the last evaluation of ``dataset`` (Detectron2 writes the final
    evaluation to no metrics.json line; the evaluator's lb_metrics.json holds it)."""
    path = out / "inference" / dataset / "lb_metrics.json"
    metrics = json.loads(path.read_text())["metrics"]
    return {
        label: math.nan if metrics[f"IoU-{name}"] is None else metrics[f"IoU-{name}"]
        for label, name in enumerate(TRASH_CLASSES)
    }


def _expected_probs(labels, iou, floor=0.05):
    """Sampling probability of each pastable label: max(1 - IoU, floor), normalised; classes not
    scored (NaN) get the mean of the scored ones."""
    raw = {c: 1.0 - iou[c] for c in labels if c in iou and math.isfinite(iou[c])}
    fill = sum(raw.values()) / len(raw)
    weights = {c: max(raw.get(c, fill), floor) for c in labels}
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()}


def _bank(out, version):
    return json.loads((out / "copy_paste_bank" / "machine0" / version / "bank.json").read_text())


def _check_weights(bank, iou):
    labels = sorted(int(c) for c in bank["class_probs"])
    expected = _expected_probs(labels, iou)
    got = {int(c): p for c, p in bank["class_probs"].items()}
    assert got == pytest.approx(expected, abs=1e-9)


def test_bank_weights_from_the_chosen_test_dataset_and_resume(tmp_path):
    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=4, num_val=2, num_test=1, image_size=SIZE, seed=0)
    out = tmp_path / "out"

    # 4 iterations: bank 0 before training, evaluation at iteration 2 -> bank 1, final evaluation
    log = _train(out, data, "SOLVER.MAX_ITER", 4, "SOLVER.BASE_LR", OLD_LR)
    assert "no per-class IoU" not in log
    assert re.search(r"copy-paste bank 1 written to \S+ \(class IoUs used: Background", log)
    lines = _metrics(out)
    iou_train, iou_val = _iou_line(lines, 1, "trash_train"), _iou_line(lines, 1, "trash_val")
    bank1 = _bank(out, "v0001")
    assert bank1["seed"] == 1
    _check_weights(bank1, iou_train)
    # the IoUs bank 1 was built from: those of trash_train (NaN = not scored, left out)
    (entry,) = [e for e in _history(out) if e["iteration"] == 1]
    assert entry["generation"] == 2 and _used(entry) == _finite(iou_train)
    assert iou_val == iou_train or _used(entry) != _finite(iou_val)
    (lr_line,) = [m for m in lines if m["iteration"] == 3 and "lr" in m]
    assert lr_line["lr"] == pytest.approx(OLD_LR * (1 - 3 / 4) ** 0.9)
    final_iou = _final_iou(out, "trash_train")

    # --resume with a longer schedule and a new BASE_LR: bank 2 (seed 2) from the IoUs of the
    # final evaluation of the first run, the lr of the first resumed iteration from the new rate
    log = _train(out, data, "SOLVER.MAX_ITER", 5, "SOLVER.BASE_LR", NEW_LR, resume=True)
    assert "Starting training from iteration 4" in log
    assert re.search(r"copy-paste bank 2 written to \S+ \(class IoUs used: Background", log)
    bank2 = _bank(out, "v0002")
    assert bank2["seed"] == 2
    _check_weights(bank2, final_iou)
    (entry,) = [e for e in _history(out) if e["iteration"] == 3]
    assert entry["generation"] == 3 and _used(entry) == _finite(final_iou)
    (lr_line,) = [m for m in _metrics(out) if m["iteration"] == 4 and "lr" in m]
    assert lr_line["lr"] == pytest.approx(NEW_LR * (1 - 4 / 5) ** 0.9)


def _history(out):
    return json.loads((out / "copy_paste_bank" / "machine0" / "state.json").read_text())["history"]


def _used(entry):
    return {int(c): pytest.approx(v, abs=1e-12) for c, v in entry["last_iou"].items()}


def _finite(iou):
    return {c: v for c, v in iou.items() if math.isfinite(v)}


def test_iou_dataset_must_be_a_test_dataset(tmp_path):
    from mask2former.engine import get_project_cfg
    from mask2former.engine.hooks import iou_prefix_from_cfg

    cfg = get_project_cfg()
    cfg.DATASETS.TEST = ("a", "b")
    assert iou_prefix_from_cfg(cfg) == "a/sem_seg/IoU-"
    cfg.INPUT.COPY_PASTE.IOU_DATASET = "b"
    assert iou_prefix_from_cfg(cfg) == "b/sem_seg/IoU-"
    cfg.DATASETS.TEST = ("b",)
    assert iou_prefix_from_cfg(cfg) == "sem_seg/IoU-"
    cfg.INPUT.COPY_PASTE.IOU_DATASET = "c"
    with pytest.raises(ValueError, match=r"IOU_DATASET 'c' is not one of DATASETS.TEST \['b'\]"):
        iou_prefix_from_cfg(cfg)
