"""TEST.AUG.ENABLED keeps its official meaning: train_net.py --eval-only also scores with
multi-scale + flip (keys ending in _TTA, files in inference_TTA), the same score as
tools/predict.py --tta --score on the same weights; tools/predict.py follows the key too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mask2former.data.offline.synthetic import generate_synthetic_trash

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
SIZE = 64


def _run(script, *args, cwd):
    cmd = [sys.executable, str(ROOT / script), "--config-file", str(CONFIG), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _lb(folder):
    return json.loads((Path(folder) / "lb_metrics.json").read_text())


def test_eval_only_tta_equals_predict_tta(tmp_path):
    from mask2former.data import register_datasets_from_cfg
    from mask2former.engine import Trainer, build_cfg

    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=2, num_val=3, num_test=1, image_size=SIZE, seed=0)
    out = tmp_path / "out"
    opts = [
        "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.CONFUSION_MATRIX_PLOT", "False",
        "INPUT.MIN_SIZE_TEST", str(SIZE),
        "INPUT.SIZE_DIVISIBILITY", "32",
        "DATASETS.TRASH_ROOT", str(data),
        "OUTPUT_DIR", str(out),
        "TEST.AUG.MIN_SIZES", "(48, 96)",
        "TEST.AUG.FLIP", "True",
    ]  # fmt: skip
    # weights: a freshly initialised tiny model (seeded)
    torch.manual_seed(0)
    cfg = build_cfg(str(CONFIG), opts)
    register_datasets_from_cfg(cfg)
    weights = tmp_path / "weights.pth"
    torch.save({"model": Trainer.build_model(cfg).state_dict()}, weights)

    log = _run(
        "train_net.py", "--eval-only", *opts, "TEST.AUG.ENABLED", True, "MODEL.WEIGHTS", weights,
        cwd=tmp_path,
    )  # fmt: skip
    assert "Running inference with test-time augmentation" in log
    plain, tta = _lb(out / "inference" / "trash_val"), _lb(out / "inference_TTA" / "trash_val")
    assert plain["num_images"] == tta["num_images"] == 3
    # the augmentation changed the predictions (so the comparison below means something)
    assert plain["confusion_matrix"] != tta["confusion_matrix"]

    _run(
        "tools/predict.py", "--weights", weights, "--dataset", "trash_val", "--tta", "--score",
        "--score-dir", tmp_path / "predict_tta", *opts, cwd=tmp_path,
    )  # fmt: skip
    predicted = _lb(tmp_path / "predict_tta")
    assert predicted["confusion_matrix"] == tta["confusion_matrix"]
    assert predicted["metrics"]["mIoU"] == pytest.approx(tta["metrics"]["mIoU"], abs=1e-12)

    # tools/predict.py without --tta follows TEST.AUG.ENABLED
    _run(
        "tools/predict.py", "--weights", weights, "--dataset", "trash_val", "--score",
        "--score-dir", tmp_path / "predict_key", *opts, "TEST.AUG.ENABLED", True, cwd=tmp_path,
    )  # fmt: skip
    assert _lb(tmp_path / "predict_key")["confusion_matrix"] == tta["confusion_matrix"]
