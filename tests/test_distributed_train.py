"""Several processes and machines, end to end with real processes (gloo on CPU), as users run them:

* ``train_net.py --num-gpus 2 MODEL.DEVICE cpu``: training with 2 data-loader workers per process
  and the copy-paste bank, periodic evaluation, bank regeneration from the evaluated IoUs,
  checkpoints; the run is killed mid-way and ``--resume``\\ d; ``--eval-only`` with 2 processes
  gives the metrics of the single-process ``--eval-only`` of the same checkpoint;
* two machines simulated on one host (``--num-machines 2 --machine-rank 0/1``, one process each,
  separate output folders as without a shared file system): one bank per machine, the same on
  both, the evaluator gathering the images of both machines, checkpoints written by rank 0 only;
* the loss normalisation: the gradient of a 2-process DDP step on two half batches equals the
  single-process gradient on the whole batch.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from detectron2.engine import create_ddp_model as detectron2_create_ddp_model
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils import comm
from tiny_runs import run_opts, train_opts

from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import launch
from mask2former.engine.ddp import create_ddp_model
from mask2former.engine.setup import build_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
SIZE = 64

COMMON = [
    *run_opts(SIZE, workers=2),
    # The bank checks need per-class IoUs that differ after 1-2 iterations; with this seed the
    # truncated-normal Swin init gives them (the official init predicts background only).
    "MODEL.SWIN.INIT", "trunc_normal",
]  # fmt: skip
TRAIN = [
    *train_opts(SIZE, batch=4),
    "INPUT.COPY_PASTE.ENABLED", "True",
    "INPUT.COPY_PASTE.BANK_SIZE", "3",
    "INPUT.COPY_PASTE.PROB", "0.5",
    "SEED", "3",
]  # fmt: skip
TIMEOUT = 600


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed") / "data"
    generate_synthetic_trash(str(root), num_train=6, num_val=2, num_test=1, image_size=SIZE, seed=0)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_net_cmd(*args):
    return [
        sys.executable,
        str(ROOT / "train_net.py"),
        "--config-file",
        str(CONFIG),
        *map(str, args),
    ]


def start(cmd, cwd, log):
    """A train_net.py process in its own session (so that it can be killed with its children)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        cmd,
        cwd=str(cwd),
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc, log, cmd):
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = Path(log).read_text()
    assert rc == 0, f"{' '.join(cmd)}\n{text[-5000:]}"
    return text


def run(cmd, cwd, log):
    return finish(start(cmd, cwd, log), log, cmd)


def metrics_lines(out):
    path = out / "metrics.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lb_metrics(out):
    return json.loads((out / "inference" / "trash_val" / "lb_metrics.json").read_text())


def bank_version(bank_dir, version):
    return json.loads((bank_dir / version / "bank.json").read_text())


def assert_weights_follow_ious(bank, ious):
    """Bank class probabilities from an evaluation: lower IoU -> higher probability."""
    probs = {int(k): v for k, v in bank["class_probs"].items()}
    assert len(set(round(p, 9) for p in probs.values())) > 1, "uniform class weights"
    ranked = sorted((iou, probs[label]) for label, iou in ious.items() if label in probs)
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:])), ranked


def ious_of(eval_line, class_names):
    return {
        label: eval_line[f"sem_seg/IoU-{name}"]
        for label, name in enumerate(class_names)
        if not math.isnan(eval_line.get(f"sem_seg/IoU-{name}", math.nan))
    }


def ious_logged(log_text, generation, class_names):
    """The class IoUs the bank hook logged for bank ``generation`` (metrics.json is written
    only every 20 iterations, so a killed run has none)."""
    marker = f"copy-paste bank {generation} written to "
    line = next(line for line in log_text.splitlines() if marker in line)
    used = line.split("(class IoUs used: ", 1)[1].rstrip(")")
    ious = dict(item.rsplit(" ", 1) for item in used.split(", "))
    return {class_names.index(name): float(v) for name, v in ious.items()}


def class_names(data_root):
    cats = json.loads((data_root / "train.json").read_text())["categories"]
    return ["Background"] + [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def wait_for(predicate, proc, log, what):
    while not predicate():
        if proc.poll() is not None:
            tail = Path(log).read_text()[-5000:]
            raise AssertionError(f"train_net.py ended before {what}\n{tail}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- 2 processes
def test_two_processes_train_kill_resume_and_eval(data_root, tmp_path):
    out = tmp_path / "out"
    opts = [*COMMON, "DATASETS.TRASH_ROOT", data_root, "OUTPUT_DIR", out]

    # 1. a long run (MAX_ITER 1000): after iteration 2 a checkpoint, the evaluation and the bank
    #    regenerated from its IoUs; killed (with its workers) as soon as that bank is current
    cmd = train_net_cmd(
        "--num-gpus",
        2,
        *opts,
        *TRAIN,
        "SOLVER.MAX_ITER",
        1000,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
        "TEST.EVAL_PERIOD",
        2,
    )
    log = tmp_path / "train.log"
    proc = start(cmd, tmp_path, log)
    bank_dir = out / "copy_paste_bank" / "machine0"
    current = bank_dir / "CURRENT"
    try:
        # (the hook logs the bank's IoUs after making it current: wait for the line too)
        wait_for(
            lambda: (
                current.is_file()
                and current.read_text() == "v0001\n"
                and "copy-paste bank 1 written to " in log.read_text()
            ),
            proc,
            log,
            "the bank regenerated after the evaluation",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert "Rank of current process: 0. World size: 2" in text
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert "LB-style evaluation of trash_val (2 images)" in text  # gathered from both processes
    # the checkpoint of iteration 2 (or a later one: the run went on while the bank was written)
    last = (out / "last_checkpoint").read_text().strip()
    assert last.startswith("model_") and last.endswith(".pth") and (out / last).is_file()
    resume_at = int(last[len("model_") : -len(".pth")]) + 1
    assert resume_at % 2 == 0
    assert bank_version(bank_dir, "v0000")["class_probs"]  # written before training (uniform)
    assert "copy-paste bank 0 written" in text and "class IoUs used: none (uniform)" in text
    assert_weights_follow_ious(
        bank_version(bank_dir, "v0001"), ious_logged(text, 1, class_names(data_root))
    )
    first = metrics_lines(out)

    # 2. --resume from that checkpoint for 2 more iterations (then the final evaluation)
    resumed = run(
        train_net_cmd(
            "--num-gpus",
            2,
            "--resume",
            *opts,
            *TRAIN,
            "SOLVER.MAX_ITER",
            resume_at + 2,
            "SOLVER.CHECKPOINT_PERIOD",
            100,
            "TEST.EVAL_PERIOD",
            0,
        ),
        tmp_path,
        tmp_path / "resume.log",
    )
    assert f"Starting training from iteration {resume_at}" in resumed
    later = metrics_lines(out)[len(first) :]
    iterations = [m["iteration"] for m in later if "total_loss" in m]
    assert iterations and min(iterations) >= resume_at and max(iterations) == resume_at + 1
    assert all(math.isfinite(m["total_loss"]) for m in later if "total_loss" in m)
    assert [m for m in later if "sem_seg/mIoU" in m]
    assert (out / "model_final.pth").is_file()

    # 3. --eval-only of the final checkpoint: 2 processes (each evaluates one of the 2 images,
    #    the evaluator gathers them) == 1 process
    weights = ["MODEL.WEIGHTS", out / "model_final.pth", "DATASETS.TRASH_ROOT", data_root]
    run(
        train_net_cmd(
            "--num-gpus", 2, "--eval-only", *COMMON, *weights, "OUTPUT_DIR", tmp_path / "eval2"
        ),
        tmp_path,
        tmp_path / "eval2.log",
    )
    run(
        train_net_cmd(
            "--num-gpus",
            1,
            "--eval-only",
            *COMMON,
            "DATALOADER.NUM_WORKERS",
            0,
            *weights,
            "OUTPUT_DIR",
            tmp_path / "eval1",
        ),
        tmp_path,
        tmp_path / "eval1.log",
    )
    two, one = lb_metrics(tmp_path / "eval2"), lb_metrics(tmp_path / "eval1")
    assert two["num_images"] == one["num_images"] == 2
    assert abs(two["metrics"]["mIoU"] - one["metrics"]["mIoU"]) <= 1e-6
    for key, value in one["metrics"].items():
        if isinstance(value, float):
            assert two["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    # the gathered confusion matrix and per-image scores (the tiny model predicts mostly
    # background after a few iterations, so these carry the comparison)
    assert two["confusion_matrix"] == one["confusion_matrix"]
    by_name = sorted(one["per_image"], key=lambda r: r["file_name"])
    assert sorted(two["per_image"], key=lambda r: r["file_name"]) == by_name


# --------------------------------------------------------------------------- 2 machines
def test_two_machines_on_one_host(data_root, tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    for machine in range(2):
        out = tmp_path / f"machine{machine}_out"
        cmd = train_net_cmd(
            "--num-gpus",
            1,
            "--num-machines",
            2,
            "--machine-rank",
            machine,
            "--dist-url",
            url,
            *COMMON,
            "DATASETS.TRASH_ROOT",
            data_root,
            "OUTPUT_DIR",
            out,
            *TRAIN,
            "SOLVER.MAX_ITER",
            3,
            "SOLVER.CHECKPOINT_PERIOD",
            2,
            "TEST.EVAL_PERIOD",
            2,
        )
        log = tmp_path / f"machine{machine}.log"
        procs.append((start(cmd, tmp_path, log), log, cmd))
    try:
        logs = [finish(*p) for p in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out0, out1 = tmp_path / "machine0_out", tmp_path / "machine1_out"
    assert "Rank of current process: 0. World size: 2" in logs[0]
    assert "Rank of current process: 1. World size: 2" in (out1 / "log.txt.rank1").read_text()

    # checkpoints, metrics and evaluation results: rank 0 only
    assert (out0 / "model_0000001.pth").is_file() and (out0 / "model_final.pth").is_file()
    assert not list(out1.glob("*.pth")) and not (out1 / "last_checkpoint").exists()
    assert not (out1 / "metrics.json").exists() and not (out1 / "inference").exists()
    # the evaluator gathered the images evaluated on both machines (one each)
    assert lb_metrics(out0)["num_images"] == 2

    # one bank per machine, in its own folder, with the same class weights and content
    bank0, bank1 = out0 / "copy_paste_bank" / "machine0", out1 / "copy_paste_bank" / "machine1"
    assert not (out0 / "copy_paste_bank" / "machine1").exists()
    assert not (out1 / "copy_paste_bank" / "machine0").exists()
    assert (bank0 / "CURRENT").read_text() == (bank1 / "CURRENT").read_text() == "v0001\n"
    assert bank_version(bank0, "v0001") == bank_version(bank1, "v0001")
    for label in sorted((bank0 / "v0001" / "labels").iterdir()):
        assert label.read_bytes() == (bank1 / "v0001" / "labels" / label.name).read_bytes()
    evals = [m for m in metrics_lines(out0) if "sem_seg/mIoU" in m]
    assert evals[0]["iteration"] == 1
    assert_weights_follow_ious(
        bank_version(bank1, "v0001"), ious_of(evals[0], class_names(data_root))
    )


# --------------------------------------------------------------------------- loss normalisation
GRADIENT_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.SWIN.DROP_PATH_RATE",
    "0.0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
]
# target masks per image: halves [0, 1] and [2, 3] with different numbers of masks (6 vs 2),
# so that the global mask count matters; and with the same number per half (3 and 3)
UNEQUAL, EQUAL = (3, 3, 1, 1), (2, 1, 1, 2)


@contextlib.contextmanager
def split_invariant_points():
    """``torch.rand`` of point coordinates ([..., P, 2]) repeats one fixed [P, 2] table for
    every mask and image: the sampled points no longer depend on the batch split (the matcher
    and the importance sampling draw them per batch)."""
    real_rand = torch.rand

    def rand(*size, device=None, dtype=None, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if size[-1] != 2 or kwargs:
            raise AssertionError(f"unexpected torch.rand{size} {kwargs} in the model")
        g = torch.Generator().manual_seed(size[-2])
        table = real_rand(size[-2], 2, generator=g, dtype=dtype)
        return table.expand(*size).contiguous().to(device)

    with mock.patch.object(torch, "rand", rand):
        yield


def make_batch(counts, seed=0):
    """Images with ``counts[i]`` rectangular target masks each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in counts:
        masks = torch.zeros(n, SIZE, SIZE, dtype=torch.uint8)
        for k in range(n):
            y, x = torch.randint(0, SIZE - 16, (2,), generator=g).tolist()
            h, w = torch.randint(8, 16, (2,), generator=g).tolist()
            masks[k, y : y + h, x : x + w] = 1
        classes = torch.randperm(10, generator=g)[:n] + 1
        batch.append(
            {
                "image": torch.randint(0, 256, (3, SIZE, SIZE), generator=g, dtype=torch.uint8),
                "classes": classes,
                "masks": masks,
            }
        )
    return batch


def to_inputs(batch):
    inputs = []
    for item in batch:
        instances = Instances((SIZE, SIZE))
        instances.gt_classes = item["classes"]
        instances.gt_masks = item["masks"].bool()
        inputs.append({"image": item["image"], "instances": instances})
    return inputs


def gradients(model, batch, class_loss=True):
    """Gradient of the weighted training loss of ``batch`` (loss_ce* weighted 0 if not
    ``class_loss``: the terms normalised by the number of masks only)."""
    module = model.module if hasattr(model, "module") else model
    weight_dict = module.criterion.weight_dict
    saved = dict(weight_dict)
    if not class_loss:
        weight_dict.update({k: 0.0 for k in weight_dict if k.startswith("loss_ce")})
    try:
        module.zero_grad()
        with split_invariant_points():
            losses = model(to_inputs(batch))
        sum(losses.values()).backward()
    finally:
        weight_dict.update(saved)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _gradient_worker(work_dir):
    """One DDP process: gradients of its half of each batch."""
    torch.set_num_threads(1)
    work_dir = Path(work_dir)
    rank = comm.get_rank()
    torch.manual_seed(0)
    model = build_model(build_cfg(str(CONFIG), GRADIENT_OPTS))
    model.load_state_dict(torch.load(work_dir / "weights.pth", weights_only=True))
    try:
        detectron2_create_ddp_model(model, broadcast_buffers=False)
        d2_error = ""
    except ValueError as e:
        d2_error = str(e)
    ddp = create_ddp_model(model, broadcast_buffers=False)
    half = slice(2 * rank, 2 * rank + 2)
    result = {
        "ddp": isinstance(ddp, torch.nn.parallel.DistributedDataParallel),
        "d2_error": d2_error,
        "unequal": gradients(ddp, make_batch(UNEQUAL)[half], class_loss=False),
        "equal": gradients(ddp, make_batch(EQUAL)[half]),
    }
    torch.save(result, work_dir / f"rank{rank}.pth")


def assert_same_gradients(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_two_process_gradient_equals_single_process_gradient(tmp_path):
    torch.manual_seed(0)
    model = build_model(build_cfg(str(CONFIG), GRADIENT_OPTS))
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    model.train()
    full_unequal = gradients(model, make_batch(UNEQUAL), class_loss=False)
    full_equal = gradients(model, make_batch(EQUAL))

    launch(_gradient_worker, 2, dist_url="auto", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    for result in ranks:
        assert result["ddp"]
        # what Detectron2's own wrap does with a CPU model (device_ids=[local rank])
        assert "device_ids" in result["d2_error"]
        assert_same_gradients(result["unequal"], full_unequal)
        assert_same_gradients(result["equal"], full_equal)

    # the check discriminates: halves normalised by their own mask counts (6 and 2 instead of
    # the global mean 4) give another gradient
    halves = [
        gradients(model, make_batch(UNEQUAL)[s], class_loss=False)
        for s in (slice(0, 2), slice(2, 4))
    ]
    local = {n: (halves[0][n] + halves[1][n]) / 2 for n in full_unequal}
    worst = max(
        ((local[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        for n, g in full_unequal.items()
    )
    assert worst > 1e-2
