"""train_net.py and tools/predict.py end to end on tiny configs (subprocesses, as users run them):
train -> checkpoint -> --resume -> --eval-only -> submission, for Mask2Former-Swin, SeMask and
DiNAT, with the copy-paste bank enabled in the Swin run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import run_opts, train_opts

from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.inference.submission import read_submission

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
SIZE = 64

COMMON = run_opts(SIZE, confusion_matrix_plot=True)
TRAIN = train_opts(SIZE)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_net") / "data"
    generate_synthetic_trash(str(root), num_train=6, num_val=2, num_test=3, image_size=SIZE, seed=0)
    return root


def run(script, config, *args, cwd):
    cmd = [sys.executable, str(ROOT / script), "--config-file", str(config), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def metrics_lines(out):
    return [
        json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()
    ]


def test_swin_train_resume_eval_and_submission(data_root, tmp_path):
    config = TINY / "m2f_swin_tiny_cpu.yaml"
    out = tmp_path / "out"
    opts = [*COMMON, "DATASETS.TRASH_ROOT", data_root, "OUTPUT_DIR", out]
    copy_paste = [
        "INPUT.COPY_PASTE.ENABLED",
        "True",
        "INPUT.COPY_PASTE.BANK_SIZE",
        "3",
        "INPUT.COPY_PASTE.PROB",
        "0.5",
        "TEST.EVAL_PERIOD",
        "2",
    ]

    # 1. train 3 iterations: checkpoint at iteration 2, periodic evaluation at 2, final one at 3
    trained = run(
        "train_net.py",
        config,
        "--num-gpus",
        1,
        *opts,
        *TRAIN,
        *copy_paste,
        "SOLVER.MAX_ITER",
        3,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
        cwd=tmp_path,
    )
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    runtime = "CPU runtime: flush_denormals=True, reuse_host_memory=True"
    assert runtime in trained.stdout + trained.stderr
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    first = metrics_lines(out)
    train_lines = [m for m in first if "total_loss" in m]
    assert max(m["iteration"] for m in train_lines) == 2
    assert all(math.isfinite(m["total_loss"]) for m in train_lines)
    evals = [m for m in first if "sem_seg/mIoU" in m]
    assert len(evals) == 2 and all(0.0 <= m["sem_seg/mIoU"] <= 1.0 for m in evals)
    bank = out / "copy_paste_bank" / "machine0"
    assert (bank / "CURRENT").read_text().strip() == "v0001"  # before training + after eval at 2

    # 2. --resume continues from the final checkpoint (iteration 3) up to the new MAX_ITER
    resumed = run(
        "train_net.py",
        config,
        "--num-gpus",
        1,
        "--resume",
        *opts,
        *TRAIN,
        "SOLVER.MAX_ITER",
        5,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "TEST.EVAL_PERIOD",
        0,
        cwd=tmp_path,
    )
    assert "Starting training from iteration 3" in resumed.stdout + resumed.stderr
    iterations = [m["iteration"] for m in metrics_lines(out)[len(first) :] if "total_loss" in m]
    assert iterations and min(iterations) >= 3 and max(iterations) == 4

    # 3. --eval-only: LB-style metrics + confusion matrix picture
    run(
        "train_net.py",
        config,
        "--eval-only",
        *opts,
        "MODEL.WEIGHTS",
        out / "model_final.pth",
        cwd=tmp_path,
    )
    report = json.loads((out / "inference" / "trash_val" / "lb_metrics.json").read_text())
    assert report["num_images"] == 2 and 0.0 <= report["metrics"]["mIoU"] <= 1.0
    assert (out / "inference" / "trash_val" / "confusion_matrix.png").stat().st_size > 1000

    # 4. submission + probability dump + overlays for the test split
    sub = tmp_path / "submission.csv"
    predicted = run(
        "tools/predict.py",
        config,
        "--weights",
        out / "model_final.pth",
        "--dataset",
        "trash_test",
        "--submission",
        sub,
        "--probs",
        tmp_path / "probs",
        "--overlays",
        tmp_path / "overlays",
        "--num-overlays",
        2,
        *opts,
        cwd=tmp_path,
    )
    assert runtime in predicted.stdout + predicted.stderr
    test_names = [
        im["file_name"] for im in json.loads((data_root / "test.json").read_text())["images"]
    ]
    assert sub.read_text().splitlines()[0] == "image_id,PredictionString"
    image_ids, masks = read_submission(str(sub))
    assert list(image_ids) == test_names and masks.shape == (3, 256, 256) and masks.max() <= 10
    assert len(list((tmp_path / "overlays").rglob("*.png"))) == 2  # mirrors the file_names
    assert json.loads((tmp_path / "probs" / "index.json").read_text())["classes"][0] == "Background"


@pytest.mark.parametrize(
    "config,extra_loss",
    [
        ("semask_swin_tiny_cpu.yaml", "loss_cate"),
        ("m2f_dinat_tiny_cpu.yaml", None),
    ],
)
def test_extension_configs_train_and_evaluate(data_root, tmp_path, config, extra_loss):
    out = tmp_path / "out"
    opts = [*COMMON, "DATASETS.TRASH_ROOT", data_root, "OUTPUT_DIR", out]
    run(
        "train_net.py",
        TINY / config,
        "--num-gpus",
        1,
        *opts,
        *TRAIN,
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "TEST.EVAL_PERIOD",
        0,
        cwd=tmp_path,
    )
    losses = [m for m in metrics_lines(out) if "total_loss" in m]
    assert losses and all(math.isfinite(m["total_loss"]) for m in losses)
    if extra_loss:
        assert all(math.isfinite(m[extra_loss]) and m[extra_loss] > 0 for m in losses)
    run(
        "train_net.py",
        TINY / config,
        "--eval-only",
        *opts,
        "MODEL.WEIGHTS",
        out / "model_final.pth",
        cwd=tmp_path,
    )
    report = json.loads((out / "inference" / "trash_val" / "lb_metrics.json").read_text())
    assert report["num_images"] == 2 and 0.0 <= report["metrics"]["mIoU"] <= 1.0
