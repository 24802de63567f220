"""Weights files through the scripts, as users run them (subprocesses): malicious files are
refused by ``train_net.py`` (training and ``--eval-only``) and ``tools/predict.py`` and run nothing,
the opt-in reads a trusted legacy file, a head that does not fit is refused for evaluation and
prediction, and a ``train_net.py`` killed (SIGKILL, by PID) while writing a checkpoint resumes to a
complete ``model_final.pth`` (as does a run left with a truncated ``model_final.pth``)."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import dead_pid
from tiny_runs import run_opts, train_opts

from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
SIZE = 64
MAX_ITER = 4

COMMON = run_opts(SIZE)
TRAIN = [*train_opts(SIZE), "TEST.EVAL_PERIOD", "0", "SOLVER.MAX_ITER", str(MAX_ITER)]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_cli") / "data"
    generate_synthetic_trash(str(root), num_train=6, num_val=2, num_test=2, image_size=SIZE, seed=0)
    return root


def command(script, *args):
    return [sys.executable, str(ROOT / script), "--config-file", str(CONFIG), *map(str, args)]


def run(cmd, cwd, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=str(cwd), env=env, capture_output=True, text=True, check=False, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{' '.join(cmd)}\n{output[-4000:]}"
    return output


def train_cmd(data_root, out, *extra, resume=False):
    flags = ["--resume"] if resume else []
    return command(
        "train_net.py",
        "--num-gpus",
        1,
        *flags,
        *COMMON,
        *TRAIN,
        "DATASETS.TRASH_ROOT",
        data_root,
        "OUTPUT_DIR",
        out,
        *extra,
    )


def eval_cmd(data_root, out, weights, *extra):
    return command(
        "train_net.py",
        "--eval-only",
        *COMMON,
        "DATASETS.TRASH_ROOT",
        data_root,
        "OUTPUT_DIR",
        out,
        "MODEL.WEIGHTS",
        weights,
        *extra,
    )


def predict_cmd(data_root, tmp_path, weights, *extra):
    return command(
        "tools/predict.py",
        "--weights",
        weights,
        "--dataset",
        "trash_test",
        "--overlays",
        tmp_path / "overlays",
        "--num-overlays",
        1,
        *COMMON,
        "DATASETS.TRASH_ROOT",
        data_root,
        *extra,
    )


@pytest.fixture(scope="module")
def clean_run(data_root, tmp_path_factory):
    """A finished run: checkpoints after iterations 1 and 3, model_final after 3."""
    out = tmp_path_factory.mktemp("clean") / "out"
    run(train_cmd(data_root, out, "SOLVER.CHECKPOINT_PERIOD", 2), cwd=out.parent)
    return out


def checkpoint_keys(path):
    ckpt = read_checkpoint(str(path))
    return sorted(ckpt), sorted(ckpt["model"]), ckpt["trainer"]["iteration"]


def assert_all_checkpoints_load(out):
    """Every checkpoint a resume could pick (last_checkpoint's target, model_*.pth) is complete."""
    for path in out.glob("model_*.pth"):
        read_checkpoint(str(path))
    last = out / "last_checkpoint"
    if last.exists():
        read_checkpoint(str(out / last.read_text().strip()))


# ------------------------------------------------------------------------------ code in a file
def malicious(tmp_path, suffix, state):
    marker = tmp_path / f"marker{suffix}"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(
                {
                    "model": {k: v.numpy() for k, v in state.items()},
                    "__author__": "x",
                    "x": RunsCode(marker),
                },
                f,
            )
    else:
        torch.save({"model": state, "x": RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_weights_are_refused_by_every_script(data_root, clean_run, tmp_path, suffix):
    state = read_checkpoint(str(clean_run / "model_final.pth"))["model"]
    path, marker = malicious(tmp_path, suffix, state)
    for cmd in (
        eval_cmd(data_root, tmp_path / "eval", path),
        train_cmd(data_root, tmp_path / "train", "MODEL.WEIGHTS", path, "SOLVER.MAX_ITER", 1),
        predict_cmd(data_root, tmp_path, path),
    ):
        output = run(cmd, cwd=tmp_path, ok=False)
        assert "UnsafeCheckpointError" in output and f"{path}: refusing" in output, output[-3000:]
        assert not marker.exists()
    assert not (tmp_path / "train" / "model_final.pth").exists()


def test_opt_in_evaluates_trusted_legacy_file(data_root, clean_run, tmp_path):
    ckpt = read_checkpoint(str(clean_run / "model_final.pth"))
    ckpt["args"] = __import__("argparse").Namespace(lr=0.1)  # a Python object: not plain data
    legacy = tmp_path / "legacy.pth"
    torch.save(ckpt, legacy)
    refused = run(eval_cmd(data_root, tmp_path / "eval", legacy), cwd=tmp_path, ok=False)
    assert f"{legacy}: refusing" in refused and "argparse.Namespace" in refused
    run(
        eval_cmd(data_root, tmp_path / "eval", legacy, "MODEL.WEIGHTS_ALLOW_CODE_EXECUTION", True),
        cwd=tmp_path,
    )
    assert (tmp_path / "eval" / "inference" / "trash_val" / "lb_metrics.json").is_file()


def test_truncated_weights_error_names_the_file(data_root, clean_run, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes((clean_run / "model_final.pth").read_bytes()[:1_500_000])
    output = run(predict_cmd(data_root, tmp_path, path), cwd=tmp_path, ok=False)
    assert f"{path}: cannot read this checkpoint (1500000 bytes;" in output
    assert "truncated or corrupt" in output and "will likely succeed" not in output


# ------------------------------------------------------------------------------ wrong head
def test_head_that_does_not_fit_is_refused_for_inference(data_root, clean_run, tmp_path):
    ckpt = read_checkpoint(str(clean_run / "model_final.pth"))
    key = "sem_seg_head.predictor.class_embed.weight"
    ckpt["model"][key] = ckpt["model"][key][:6]  # a 5-class head (+ no-object)
    ckpt["model"][key.replace("weight", "bias")] = ckpt["model"][key.replace("weight", "bias")][:6]
    path = tmp_path / "five_classes.pth"
    torch.save(ckpt, path)
    for cmd in (
        eval_cmd(data_root, tmp_path / "eval", path),
        predict_cmd(data_root, tmp_path, path),
    ):
        output = run(cmd, cwd=tmp_path, ok=False)
        assert f"{path}: does not fit the model" in output
        assert f"{key} (6, 64) in the file vs (12, 64) in the model" in output
    assert not (tmp_path / "overlays").exists() or not list((tmp_path / "overlays").iterdir())
    # training from it warns once with the counts and trains
    output = run(
        train_cmd(data_root, tmp_path / "train", "MODEL.WEIGHTS", path, "SOLVER.MAX_ITER", 1),
        cwd=tmp_path,
    )
    assert "0 missing from the file, 2 with another shape" in output


# ------------------------------------------------------------------------------ kill and resume
def test_kill_while_writing_a_checkpoint_then_resume(data_root, clean_run, tmp_path):
    full_size = (clean_run / "model_final.pth").stat().st_size
    out = tmp_path / "out"
    cmd = train_cmd(data_root, out, "SOLVER.CHECKPOINT_PERIOD", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_during_write = False
    for _ in range(5):  # each run writes 5 checkpoints; one write caught is enough
        shutil.rmtree(out, ignore_errors=True)
        with open(tmp_path / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=log, stderr=log)
            while proc.poll() is None:
                names = os.listdir(out) if out.is_dir() else []
                # a temporary file being written, or a checkpoint file still growing in place
                writing = any(n.endswith(".tmp") for n in names) or any(
                    n.endswith(".pth") and os.path.getsize(out / n) < full_size for n in names
                )
                if writing:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_during_write = True
                    break
                time.sleep(0.001)
            proc.wait()
        if killed_during_write:
            break
    assert killed_during_write, "no checkpoint write was caught"
    assert_all_checkpoints_load(out)

    output = run(
        train_cmd(data_root, out, "SOLVER.CHECKPOINT_PERIOD", 1, resume=True), cwd=tmp_path
    )
    assert not list(out.glob(".*.tmp"))
    assert_all_checkpoints_load(out)
    clean = checkpoint_keys(clean_run / "model_final.pth")
    assert checkpoint_keys(out / "model_final.pth") == clean
    assert "Starting training from iteration" in output


def test_resume_repairs_a_truncated_final_checkpoint(data_root, clean_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size * 15 // 84])  # 1.5 of 8.4 MB
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    # a partial file from a killed save is never used
    shutil.copy(out / "model_0000001.pth", out / f".model_0000003.pth.{dead_pid()}.0badf00d.tmp")
    output = run(
        train_cmd(data_root, out, "SOLVER.CHECKPOINT_PERIOD", 2, resume=True), cwd=tmp_path
    )
    assert f"Resuming from {out / 'model_0000003.pth'}" in output and str(final) in output
    assert "Starting training from iteration 4" in output  # iteration 3 was the last one
    assert not list(out.glob(".*.tmp"))
    assert checkpoint_keys(final) == checkpoint_keys(clean_run / "model_final.pth")
