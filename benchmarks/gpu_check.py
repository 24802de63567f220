#!/usr/bin/env python
"""GPU self-check: the GPU code paths of the three models, in under 5 minutes on one GPU.

    python benchmarks/gpu_check.py [--output output/gpu_check.json] [--steps 3]
        [--skip train,syncs,parity,attention,deformable,inference]

Without CUDA it prints why it is skipped and exits 0. Checks (random weights and synthetic
data; nothing is downloaded):

* train      - Mask2Former with Swin-L, SeMask Swin-L and DiNAT-L (configs/*.yaml), 512x512 crops,
               batch 2: one warm-up and ``--steps`` training steps (the project's training loop,
               optimizer and gradient clipping) in fp32 and with AMP in float16 and bfloat16; the
               losses and gradients must be finite (float16 steps that the loss scaler skips are
               counted); images/s and peak GPU memory;
* syncs      - blocking host-device synchronisations in one fp32 training step (after a warm-up
               step) of each of the three large models, counted with
               ``torch.cuda.set_sync_debug_mode("warn")``; the five places that sync most. The
               step includes Detectron2's per-loss metric read-back (one sync per loss term).
               Fails at 250 or more (what reading the code found before the device caches);
* parity     - the tiny CPU configs (configs/tiny/*) with the same weights on CPU and on the GPU
               (TF32 off): largest difference of the per-class scores of one 128x128 image;
* attention  - DiNAT's neighborhood attention: compiled flex attention (with rpb) and NATTEN's
               fused kernel (without rpb, when NATTEN is installed with its library) against the
               tiled path, forward and backward, kernel 11, dilations 1 and 4, fp32;
* deformable - multi-scale deformable attention "pytorch" (grid_sample) against "fast" on the GPU,
               forward and backward;
* inference  - images/s of Mask2Former Swin-T at 512x512 and Swin-L at 640x640 with 150 classes
               (ADE20K-style), fp32, batch 1; the mmsegmentation port reports 23.8 and 8.8 FPS on
               an A100.

One table is printed and the results are written as JSON (``--output``). The exit status is 1
when a check fails.
"""

import argparse
import collections
import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

import dinat
from mask2former.engine import build_cfg, build_optimizer
from mask2former.engine.trainer import build_step_trainer
from mask2former.modeling import MSDeformAttn
from mask2former.modeling.pixel_decoder.deformable_attention_triton import triton_available
from semask import add_semask_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_MODELS = {
    "Mask2Former Swin-L": "m2f_swin_l.yaml",
    "SeMask Swin-L": "semask_swin_l.yaml",
    "Mask2Former DiNAT-L": "m2f_dinat_l.yaml",
}
PRECISIONS = ("fp32", "float16", "bfloat16")
TINY_MODELS = ("m2f_swin_tiny_cpu.yaml", "semask_swin_tiny_cpu.yaml", "m2f_dinat_tiny_cpu.yaml")
INFERENCE_MODELS = {
    "Swin-T 512x512": ("m2f_swin_t.yaml", 512, 23.8),
    "Swin-L 640x640": ("m2f_swin_l.yaml", 640, 8.8),
}
CHECKS = ("train", "syncs", "parity", "attention", "deformable", "inference")
# Largest differences accepted (fp32 on both sides; different kernels and summation orders).
PARITY_TOL = 1e-3
ATTENTION_TOL = 1e-4
DEFORMABLE_TOL = 1e-4
# A training step with this many blocking host-device synchronisations or more fails "syncs".
MAX_SYNCS_PER_STEP = 250


def cuda_skip_reason():
    """Why the check cannot run here, or None when a CUDA device is available."""
    if torch.cuda.is_available():
        return None
    return (
        f"CUDA is not available (torch {torch.__version__}, built with CUDA "
        f"{torch.version.cuda or 'none'}): the GPU self-check needs a CUDA GPU"
    )


def synthetic_batch(batch_size, size, num_classes, seed=0):
    """``batch_size`` training inputs: random images and label maps of random rectangles, with
    the per-class masks the semantic mapper would make (``image``, ``sem_seg``, ``instances``)."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        sem_seg = torch.zeros(size, size, dtype=torch.long)
        for _ in range(4):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            sem_seg[y : y + h, x : x + w] = int(torch.randint(1, num_classes, (1,), generator=g))
        classes = torch.unique(sem_seg)
        instances = Instances((size, size))
        instances.gt_classes = classes
        instances.gt_masks = sem_seg[None] == classes[:, None, None]
        inputs.append(
            {
                "image": image,
                "sem_seg": sem_seg,
                "instances": instances,
                "height": size,
                "width": size,
            }
        )
    return inputs


def _repeat(item):
    while True:
        yield item


def model_cfg(config, device, opts=()):
    return build_cfg(
        str(CONFIGS / config),
        ["MODEL.DEVICE", device, *map(str, opts)],
        (add_semask_config, dinat.add_dinat_config),
    )


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and convolutions: the comparisons are between fp32 results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _peak_memory_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(config, precision, device, steps=3, batch_size=2, size=512, opts=()):
    """Warm-up + ``steps`` training steps of ``config``; a result row."""
    amp = (
        ["SOLVER.AMP.ENABLED", "False"]
        if precision == "fp32"
        else ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision]
    )
    cfg = model_cfg(config, device, [*amp, *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(batch_size, size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    loop = build_step_trainer(cfg, model, _repeat(batch), optimizer)
    scaler = getattr(loop, "grad_scaler", None)
    losses, bad_grads, skipped = [], 0, 0
    with EventStorage(0) as storage:
        loop.storage = storage
        for step in range(steps + 1):
            if step == 1:  # the first step compiles / autotunes: not timed
                _sync(device)
                _peak_memory_reset(device)
                start = time.perf_counter()
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
            loop.iter = step
            loop.run_step()
            storage.step()
            total = sum(float(v[0]) for k, v in storage.latest().items() if k.startswith("loss"))
            losses.append(total)
            grads_finite = all(
                torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
            )
            if scale is not None and scaler.get_scale() < scale:
                skipped += 1  # the scaler found inf/NaN gradients and skipped the step
            elif not grads_finite:
                bad_grads += 1
        _sync(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if "cuda" in str(device) else None
    finite = all(math.isfinite(v) for v in losses[1:]) and bad_grads == 0 and skipped < steps
    return {
        "check": "train",
        "case": f"{config} {precision}",
        "ok": finite,
        "images_per_s": steps * batch_size / elapsed,
        "peak_memory_gib": peak,
        "losses": losses,
        "steps_skipped_by_loss_scaler": skipped,
        "non_finite_gradient_steps": bad_grads,
    }


def sync_count(config, device, batch_size=2, size=512):
    """Blocking host-device synchronisations of one fp32 training step of ``config`` (after a
    warm-up step); a result row. Only CUDA reports them: on other devices the count is 0."""
    cfg = model_cfg(config, device, ["SOLVER.AMP.ENABLED", "False"])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(batch_size, size, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    loop = build_step_trainer(cfg, model, _repeat(batch), optimizer)
    cuda = torch.device(device).type == "cuda"
    with EventStorage(0) as storage:
        loop.storage = storage
        loop.iter = 0
        loop.run_step()
        storage.step()
        _sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.iter = 1
                loop.run_step()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {
        "check": "syncs",
        "case": config,
        "ok": len(syncs) < MAX_SYNCS_PER_STEP,
        "syncs_per_step": len(syncs),
        "top_places": "; ".join(f"{k} x{n}" for k, n in places.most_common(5)),
    }


@torch.no_grad()
@exact_fp32()
def parity(config, device, size=128):
    """Largest |score difference| of one image between the CPU and ``device`` (same weights)."""
    torch.manual_seed(0)
    cpu_model = build_model(model_cfg(config, "cpu")).eval()
    gpu_model = build_model(model_cfg(config, device)).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    image = synthetic_batch(1, size, 2)[0]["image"]
    inputs = [{"image": image, "height": size, "width": size}]
    cpu = cpu_model(inputs)[0]["sem_seg"]
    gpu = gpu_model(inputs)[0]["sem_seg"].cpu()
    diff = (cpu - gpu).abs().max().item()
    return {
        "check": "parity",
        "case": config,
        "ok": diff <= PARITY_TOL,
        "max_abs_diff": diff,
        "tolerance": PARITY_TOL,
    }


def _forward_backward(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves if x is not None]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@exact_fp32()
def neighborhood_attention(device, size=64, heads=4, head_dim=32, kernel=11):
    """flex (compiled) and NATTEN against the tiled path, forward and backward."""
    rows = []
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, size, size, heads, head_dim, generator=g).to(device) for _ in range(3)
    )
    rpb = (torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g) * 0.1).to(device)
    grad_out = torch.randn(1, size, size, heads, head_dim, generator=g).to(device)
    for impl, bias in (("flex", rpb), ("natten", None)):
        for dilation in (1, 4):
            case = f"{impl} vs tiled, dilation {dilation}, rpb {bias is not None}"

            def run(name, bias=bias, dilation=dilation):
                def fn(q, k, v, b=None):
                    return dinat.na2d(q, k, v, b, kernel, dilation, impl=name)

                return _forward_backward(fn, [q, k, v, bias], grad_out)

            try:
                out, grads = run(impl)
            except ImportError as e:  # NATTEN not installed
                rows.append({"check": "attention", "case": case, "ok": None, "skipped": str(e)})
                continue
            ref_out, ref_grads = run("tiled")
            fwd, bwd = _max_diff([out], [ref_out]), _max_diff(grads, ref_grads)
            rows.append(
                {
                    "check": "attention",
                    "case": case,
                    "ok": fwd <= ATTENTION_TOL and bwd <= ATTENTION_TOL,
                    "forward_max_abs_diff": fwd,
                    "backward_max_abs_diff": bwd,
                    "tolerance": ATTENTION_TOL,
                }
            )
    return rows


@exact_fp32()
def deformable_attention(
    device,
    candidate="fast",
    d_model=256,
    heads=8,
    points=4,
    shapes=((64, 64), (32, 32), (16, 16)),
    runs=10,
):
    """MSDeformAttn ``candidate`` ("fast" or "triton") against "pytorch" (``grid_sample``) on
    ``device``: forward and backward differences, and the median forward + backward time of each
    over ``runs`` runs (the speed-up of the candidate over grid_sample)."""
    torch.manual_seed(0)
    levels = len(shapes)
    attn = MSDeformAttn(
        d_model=d_model, n_levels=levels, n_heads=heads, n_points=points, impl="pytorch"
    ).to(device)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.1)
        attn.attention_weights.weight.normal_(std=0.1)
    shapes = [tuple(s) for s in shapes]
    g = torch.Generator().manual_seed(1)
    length = sum(h * w for h, w in shapes)
    src = torch.randn(2, length, d_model, generator=g).to(device)
    ref = torch.rand(2, length, levels, 2, generator=g).to(device)
    grad_out = torch.randn(2, length, d_model, generator=g).to(device)
    results, seconds = {}, {}
    for impl in ("pytorch", candidate):
        attn.impl = impl
        times = []
        for _ in range(max(runs, 1)):
            attn.zero_grad()
            query = src.clone().requires_grad_(True)
            _sync(device)
            start = time.perf_counter()
            out = attn(query, ref, query, shapes)
            out.backward(grad_out)
            _sync(device)
            times.append(time.perf_counter() - start)
        results[impl] = (out.detach(), [query.grad, *(p.grad for p in attn.parameters())])
        seconds[impl] = sorted(times)[len(times) // 2]
    fwd = _max_diff([results[candidate][0]], [results["pytorch"][0]])
    bwd = _max_diff(results[candidate][1], results["pytorch"][1])
    return {
        "check": "deformable",
        "case": f"{candidate} vs pytorch",
        "ok": max(fwd, bwd) <= DEFORMABLE_TOL,
        "forward_max_abs_diff": fwd,
        "backward_max_abs_diff": bwd,
        "tolerance": DEFORMABLE_TOL,
        f"{candidate}_fwd_bwd_ms": 1e3 * seconds[candidate],
        "pytorch_fwd_bwd_ms": 1e3 * seconds["pytorch"],
        "speedup_vs_pytorch": seconds["pytorch"] / seconds[candidate],
    }


@torch.no_grad()
def inference_speed(name, config, size, published, device, warmup=5, runs=20, num_classes=150):
    cfg = model_cfg(config, device, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes])
    model = build_model(cfg).eval()
    inputs = [{"image": synthetic_batch(1, size, 2)[0]["image"], "height": size, "width": size}]
    for _ in range(warmup):
        model(inputs)
    _sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        model(inputs)
    _sync(device)
    fps = runs / (time.perf_counter() - start)
    return {
        "check": "inference",
        "case": f"{name}, {num_classes} classes, fp32",
        "ok": True,
        "images_per_s": fps,
        "published_mmseg_a100_fps": published,
    }


def _figures(row):
    keys = [k for k in row if k not in ("check", "case", "ok", "losses")]
    parts = []
    for k in keys:
        v = row[k]
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def format_table(rows):
    """One markdown table of all rows."""
    lines = ["| check | case | result | figures |", "|---|---|---|---|"]
    for row in rows:
        result = "skipped" if row["ok"] is None else "ok" if row["ok"] else "FAIL"
        lines.append(f"| {row['check']} | {row['case']} | {result} | {_figures(row)} |")
    return "\n".join(lines)


def write_json_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_checks(device, checks=CHECKS, steps=3):
    rows = []

    def guarded(check, case, fn, *args, **kwargs):
        """A check that raises (e.g. out of memory, a kernel that does not compile) fails."""
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # reported in the table, the other checks still run
            out = {"check": check, "case": case, "ok": False, "error": f"{type(e).__name__}: {e}"}
        rows.extend(out if isinstance(out, list) else [out])
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()

    if "train" in checks:
        for config in TRAIN_MODELS.values():
            for precision in PRECISIONS:
                guarded(
                    "train",
                    f"{config} {precision}",
                    train_steps,
                    config,
                    precision,
                    device,
                    steps=steps,
                )
    if "syncs" in checks:
        for config in TRAIN_MODELS.values():
            guarded("syncs", config, sync_count, config, device)
    if "parity" in checks:
        for config in TINY_MODELS:
            guarded("parity", config, parity, "tiny/" + config, device)
    if "attention" in checks:
        guarded("attention", "neighborhood attention", neighborhood_attention, device)
    if "deformable" in checks:
        guarded("deformable", "fast vs pytorch", deformable_attention, device)
        if triton_available(device):
            guarded("deformable", "triton vs pytorch", deformable_attention, device, "triton")
        else:
            rows.append(
                {
                    "check": "deformable",
                    "case": "triton vs pytorch",
                    "ok": None,
                    "skipped": f"Triton cannot run on {device}",
                }
            )
    if "inference" in checks:
        for name, (config, size, published) in INFERENCE_MODELS.items():
            guarded("inference", name, inference_speed, name, config, size, published, device)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="output/gpu_check.json", help="JSON results file")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per case")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to leave out {CHECKS}")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(CHECKS):
        parser.error(f"unknown checks in --skip: {sorted(skip - set(CHECKS))}; one of {CHECKS}")

    reason = cuda_skip_reason()
    if reason:
        print(f"gpu_check: skipped: {reason}")
        return 0
    device = "cuda"
    start = time.perf_counter()
    rows = run_checks(device, [c for c in CHECKS if c not in skip], steps=args.steps)
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": time.perf_counter() - start,
        "results": rows,
    }
    print(format_table(rows))
    print(
        f"{report['device']}, torch {report['torch']}, {report['seconds']:.0f} s; "
        f"written to {args.output}"
    )
    write_json_atomic(args.output, report)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
