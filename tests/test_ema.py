"""EMA of the weights: update maths against hand computations, swap-in/restore, state round trip,
export, two gloo processes running the hooks, and train_net.py training / resuming with it."""

import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_runs import run_opts, train_opts
from torch import nn

from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import EMAEvalHook, EMAHook, ModelEMA, export_ema_weights
from mask2former.engine.ema import FINAL_EMA_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


class TwoParams(nn.Module):
    """Two scalar parameters, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-2.0))
        self.register_buffer("stat", torch.tensor(10.0))
        self.register_buffer("count", torch.tensor(0))

    def set(self, a, b, stat, count):
        with torch.no_grad():
            self.a.fill_(a)
            self.b.fill_(b)
            self.stat.fill_(stat)
            self.count.fill_(count)


def test_update_follows_hand_computation_with_warmup():
    model = TwoParams()
    ema = ModelEMA(model, decay=0.9, warmup_iters=2.0, buffers="average")
    model.set(3.0, 0.0, 20.0, 1)
    ema.update(model)
    model.set(5.0, 4.0, 30.0, 2)
    ema.update(model)
    # by hand: d1 = 0.9 (1 - e^-1/2), d2 = 0.9 (1 - e^-1)
    d1 = 0.9 * (1 - math.exp(-0.5))
    d2 = 0.9 * (1 - math.exp(-1.0))
    a1 = d1 * 1.0 + (1 - d1) * 3.0
    b1 = d1 * -2.0 + (1 - d1) * 0.0
    s1 = d1 * 10.0 + (1 - d1) * 20.0
    assert ema.num_updates == 2
    assert ema.shadow["a"].item() == pytest.approx(d2 * a1 + (1 - d2) * 5.0, rel=1e-6)
    assert ema.shadow["b"].item() == pytest.approx(d2 * b1 + (1 - d2) * 4.0, rel=1e-6)
    assert ema.shadow["stat"].item() == pytest.approx(d2 * s1 + (1 - d2) * 30.0, rel=1e-6)
    assert ema.shadow["count"].item() == 2 and ema.shadow["count"].dtype == torch.int64
    assert ema.shadow["a"].dtype == torch.float32
    # the model's own tensors are untouched by the update
    assert model.a.item() == 5.0 and model.stat.item() == 30.0


def test_constant_decay_and_copied_buffers():
    model = TwoParams()
    ema = ModelEMA(model, decay=0.75, warmup_iters=0, buffers="copy")
    for a, stat in ((2.0, 11.0), (6.0, 12.0), (-2.0, 13.0)):
        model.set(a, 0.0, stat, 0)
        ema.update(model)
    # 0.75^3 * 1 + 0.25 (0.75^2 * 2 + 0.75 * 6 + (-2))
    assert ema.shadow["a"].item() == pytest.approx(0.421875 + 0.25 * (1.125 + 4.5 - 2.0), rel=1e-6)
    assert ema.shadow["stat"].item() == 13.0  # followed the model


def test_frozen_value_stays_exact():
    # lerp toward an unchanged value leaves it bit for bit (frozen stages, frozen BN)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.999, warmup_iters=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        ema.update(model)
    for name, value in before.items():
        assert torch.equal(ema.shadow[name], value)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def train_a_little(model, ema, steps=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=generator)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


def test_applied_to_swaps_in_and_restores_exactly():
    model = small_net()
    ema = ModelEMA(model, decay=0.5, warmup_iters=0)
    train_a_little(model, ema)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    reference = small_net(seed=7)
    reference.load_state_dict(ema.model_state_dict())
    reference.eval()
    model.eval()
    with ema.applied_to(model):
        for name, value in model.state_dict().items():
            assert torch.equal(value, ema.shadow[name].to(value.dtype))
        assert torch.equal(model(x), reference(x))
    assert not torch.equal(raw["0.weight"], ema.shadow["0.weight"])  # the swap was not a no-op
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    with pytest.raises(RuntimeError, match="boom"):
        with ema.applied_to(model):
            raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_state_dict_round_trip_and_mismatch_errors():
    model = small_net()
    ema = ModelEMA(model, decay=0.9, warmup_iters=2)
    train_a_little(model, ema, steps=2)
    buffer = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)["ema"]

    restored = ModelEMA(small_net(seed=3), decay=0.9, warmup_iters=2)
    assert not restored.restored
    restored.load_state_dict(saved)
    assert restored.restored and restored.num_updates == 2
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name])
    # continuing from the restored state = continuing the original one
    ema.update(model)
    restored.update(model)
    assert restored.num_updates == 3
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name])

    other = ModelEMA(nn.Sequential(nn.Linear(4, 6)), decay=0.9)
    with pytest.raises(ValueError, match="does not match the model"):
        other.load_state_dict(saved)
    wider = ModelEMA(
        nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)), decay=0.9
    )
    with pytest.raises(ValueError, match="has shape"):
        wider.load_state_dict(saved)
    with pytest.raises(ValueError, match="does not match its EMA"):
        ema.update(nn.Linear(4, 6))


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        ModelEMA(nn.Linear(1, 1), decay=1.0)
    with pytest.raises(ValueError, match="SOLVER.EMA.BUFFERS"):
        ModelEMA(nn.Linear(1, 1), decay=0.9, buffers="mean")


def test_export_ema_weights(tmp_path):
    model = small_net()
    ema = ModelEMA(model, decay=0.5, warmup_iters=0)
    train_a_little(model, ema)
    checkpoint = tmp_path / "model_0000002.pth"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "iteration": 2}, checkpoint)
    out = tmp_path / "model_0000002_ema.pth"
    export_ema_weights(str(checkpoint), str(out))
    exported = torch.load(out, weights_only=True)
    assert exported["iteration"] == 2
    assert exported["model"].keys() == model.state_dict().keys()
    for name, value in ema.model_state_dict().items():
        assert torch.equal(exported["model"][name], value)
    assert exported["model"]["1.num_batches_tracked"].dtype == torch.int64

    plain = tmp_path / "plain.pth"
    torch.save({"model": model.state_dict()}, plain)
    with pytest.raises(ValueError, match="plain.pth: no 'ema' entry"):
        export_ema_weights(str(plain), str(tmp_path / "x.pth"))


# ------------------------------------------------------------------ two gloo processes


class LossNet(nn.Module):
    """A tiny model returning a loss dict in training and predictions in eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        if self.training:
            return {"loss": self.net(x).square().mean()}
        return self.net(x)


def batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    while True:
        yield torch.randn(4, 4, generator=generator)


PROBE = torch.linspace(-1, 1, 12).reshape(3, 4)


def _ddp_worker(rank, world_size, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.engine import SimpleTrainer, hooks
        from detectron2.utils import comm
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(LossNet())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        trainer = SimpleTrainer(model, batches(rank), optimizer)
        checkpointer = DetectionCheckpointer(model, save_dir=out_dir)
        ema = ModelEMA(model, decay=0.8, warmup_iters=1.0)
        raw_weights, ema_probe = [], []

        class Record(hooks.HookBase):
            def after_step(self):
                raw_weights.append({k: v.clone() for k, v in model.module.state_dict().items()})

        def evaluate():
            # distributed like an evaluator: every rank computes, the main process reports
            model.eval()
            with torch.no_grad():
                out = model.module(PROBE).sum()
            total = out.clone()
            dist.all_reduce(total)
            model.train()
            ema_probe.append(out.item())
            if not comm.is_main_process():
                return {}
            return {"sem_seg": {"probe": total.item() / world_size}}

        hook_list = [Record(), EMAHook(ema, checkpointer, out_dir)]
        if comm.is_main_process():
            hook_list.append(hooks.PeriodicCheckpointer(checkpointer, 100))
        hook_list.append(EMAEvalHook(ema, 2, evaluate))
        trainer.register_hooks(hook_list)
        trainer.train(0, 5)
        result = {
            "shadow": {k: v.clone() for k, v in ema.shadow.items()},
            "num_updates": ema.num_updates,
            "raw": raw_weights,
            "final_raw": {k: v.clone() for k, v in model.module.state_dict().items()},
            "ema_probe": ema_probe,
            "storage": trainer.storage.history("ema/sem_seg/probe").values()
            if comm.is_main_process()
            else None,
        }
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_identical_emas(tmp_path):
    init_method = f"file://{tmp_path / 'pg_init'}"
    mp.start_processes(
        _ddp_worker, args=(2, init_method, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    r0, r1 = ranks
    assert r0["num_updates"] == r1["num_updates"] == 5
    for name in r0["shadow"]:
        assert torch.equal(r0["shadow"][name], r1["shadow"][name]), name
    # the EMA is the hand-written recursion over the (DDP-synchronised) weights after each step
    expected = {k: v.clone() for k, v in LossNet().state_dict().items()}
    for t, weights in enumerate(r0["raw"], start=1):
        d = 0.8 * (1 - math.exp(-t))
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    for name, value in expected.items():
        torch.testing.assert_close(r0["shadow"][name], value, rtol=1e-6, atol=1e-7)
        assert not torch.equal(r0["final_raw"][name], r0["shadow"][name])
    # evaluated at iterations 2, 4 and after the last one, on both ranks, with the EMA weights
    assert len(r0["ema_probe"]) == len(r1["ema_probe"]) == 3
    probe_model = LossNet().eval()
    probe_model.load_state_dict({k: v for k, v in r0["shadow"].items()})
    with torch.no_grad():
        final_probe = probe_model(PROBE).sum().item()
    assert r0["ema_probe"][-1] == pytest.approx(final_probe, rel=1e-6)
    # (the final evaluation is stored at the storage's iteration after training, as EvalHook's)
    assert [it for _, it in r0["storage"]][:2] == [1, 3] and len(r0["storage"]) == 3
    assert r0["storage"][-1][0] == pytest.approx(final_probe, rel=1e-6)
    # the checkpoint of the main process holds the EMA; the final EMA weights file too
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    final = torch.load(tmp_path / FINAL_EMA_CHECKPOINT, weights_only=True)
    assert saved["ema"]["num_updates"] == 5 and final["iteration"] == 4
    for name in r0["shadow"]:
        assert torch.equal(saved["ema"]["shadow"][name], r0["shadow"][name])
        assert torch.equal(final["model"][name], r0["shadow"][name])
        assert torch.equal(saved["model"][name], r0["final_raw"][name])


# ------------------------------------------------------------------ train_net.py

SIZE = 64
COMMON = run_opts(SIZE)
TRAIN = [
    *train_opts(SIZE),
    "SOLVER.EMA.ENABLED", "True",
    "SOLVER.EMA.DECAY", "0.9",
    "SOLVER.EMA.WARMUP_ITERS", "2",
]  # fmt: skip


def run(*args, cwd):
    cmd = [sys.executable, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_train_net_evaluates_saves_and_resumes_the_ema(tmp_path):
    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=4, num_val=2, num_test=1, image_size=SIZE, seed=0)
    out = tmp_path / "out"
    config = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
    opts = [*COMMON, "DATASETS.TRASH_ROOT", data, "OUTPUT_DIR", out]

    # 1. 3 iterations: evaluation (raw and EMA) at iteration 2 and after the last one
    run(
        ROOT / "train_net.py",
        "--config-file",
        config,
        "--num-gpus",
        1,
        *opts,
        *TRAIN,
        "SOLVER.MAX_ITER",
        3,
        "SOLVER.CHECKPOINT_PERIOD",
        100,
        "TEST.EVAL_PERIOD",
        2,
        cwd=tmp_path,
    )
    lines = [json.loads(s) for s in (out / "metrics.json").read_text().splitlines() if s.strip()]
    evals = [m for m in lines if "sem_seg/mIoU" in m]
    assert len(evals) == 2 and evals[0]["iteration"] == 1  # raw and EMA in the same lines
    for m in evals:
        assert 0.0 <= m["sem_seg/mIoU"] <= 1.0 and 0.0 <= m["ema/sem_seg/mIoU"] <= 1.0
    ema_report = json.loads((out / "inference_ema" / "trash_val" / "lb_metrics.json").read_text())
    assert ema_report["num_images"] == 2
    assert ema_report["metrics"]["mIoU"] == pytest.approx(evals[-1]["ema/sem_seg/mIoU"], abs=1e-9)
    raw_report = json.loads((out / "inference" / "trash_val" / "lb_metrics.json").read_text())
    assert raw_report["metrics"]["mIoU"] == pytest.approx(evals[-1]["sem_seg/mIoU"], abs=1e-9)

    first = torch.load(out / "model_final.pth", weights_only=True)
    assert first["iteration"] == 2 and first["ema"]["num_updates"] == 3
    final_ema = torch.load(out / FINAL_EMA_CHECKPOINT, weights_only=True)
    assert final_ema["model"].keys() == first["model"].keys()
    for name, value in first["ema"]["shadow"].items():
        assert torch.equal(final_ema["model"][name], value.to(first["model"][name].dtype))
    differs = [
        n
        for n, v in first["model"].items()
        if v.is_floating_point() and not torch.equal(v, first["ema"]["shadow"][n])
    ]
    assert differs  # the EMA is not the raw weights

    # 2. --eval-only on the final EMA weights file (a plain model checkpoint) gives the score the
    #    training's final EMA evaluation logged
    run(
        ROOT / "train_net.py",
        "--config-file",
        config,
        "--eval-only",
        *opts,
        "MODEL.WEIGHTS",
        out / FINAL_EMA_CHECKPOINT,
        cwd=tmp_path,
    )
    report = json.loads((out / "inference" / "trash_val" / "lb_metrics.json").read_text())
    assert report["metrics"]["mIoU"] == pytest.approx(evals[-1]["ema/sem_seg/mIoU"], abs=1e-9)

    # 3. --resume to MAX_ITER 5, checkpoint every iteration: the checkpoint of iteration 3 holds
    #    EMA update 4 = d4 * (restored EMA of update 3) + (1 - d4) * (raw weights of iteration 3)
    log = run(
        ROOT / "train_net.py",
        "--config-file",
        config,
        "--num-gpus",
        1,
        "--resume",
        *opts,
        *TRAIN,
        "SOLVER.MAX_ITER",
        5,
        "SOLVER.CHECKPOINT_PERIOD",
        1,
        "TEST.EVAL_PERIOD",
        0,
        "SOLVER.EMA.EVAL",
        "False",
        cwd=tmp_path,
    )
    assert "EMA of the weights restored from the checkpoint (3 updates)" in log
    step3 = torch.load(out / "model_0000003.pth", weights_only=True)
    assert step3["ema"]["num_updates"] == 4
    d4 = 0.9 * (1 - math.exp(-4 / 2))
    for name, saved in first["ema"]["shadow"].items():
        raw3 = step3["model"][name]
        if raw3.is_floating_point():
            torch.testing.assert_close(
                step3["ema"]["shadow"][name], d4 * saved + (1 - d4) * raw3, rtol=1e-5, atol=1e-7
            )
        else:
            assert torch.equal(step3["ema"]["shadow"][name], raw3)
    assert torch.load(out / "model_final.pth", weights_only=True)["ema"]["num_updates"] == 5


def test_trainer_hook_order_with_copy_paste(tmp_path):
    from detectron2.engine import hooks

    from mask2former.data import register_datasets_from_cfg
    from mask2former.engine import Trainer, build_cfg
    from mask2former.engine.hooks import CopyPasteBankHook

    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=2, num_val=1, num_test=1, image_size=SIZE, seed=0)
    cfg = build_cfg(
        str(ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"),
        [
            *COMMON,
            *TRAIN,
            "DATASETS.TRASH_ROOT",
            str(data),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
            "INPUT.COPY_PASTE.ENABLED",
            "True",
            "TEST.EVAL_PERIOD",
            "2",
        ],
    )
    register_datasets_from_cfg(cfg)
    trainer = Trainer(cfg)
    kinds = [type(h) for h in trainer._hooks]
    # update before the checkpointer; EMA evaluation after the raw one and the bank hook reading
    # the raw IoUs, before the writer
    order = [
        EMAHook,
        hooks.PeriodicCheckpointer,
        hooks.EvalHook,
        CopyPasteBankHook,
        EMAEvalHook,
        hooks.PeriodicWriter,
    ]
    assert [k for k in kinds if k in order] == order
    assert isinstance(trainer.checkpointer.checkpointables["ema"], ModelEMA)
