#!/usr/bin/env python
"""How far CPU inference (and, with ``--train``, a training step) is from its arithmetic floor:
per component of Mask2Former Swin-T, the matrix-product FLOPs, the measured time and the time
those FLOPs take at the machine's measured matrix-product rate.

    python benchmarks/bench_floor.py [--repeats 5] [--threads N] [--size 512] [--bf16] [--train]
        [--profile]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions
and attention; elementwise work and the deformable-attention gather are not counted, so the floor
is a lower bound). The rate is the median GFLOP/s of square fp32 matrix products of the model's
size range on the same threads, measured in the same run. Each step of the eval-mode forward (the
calls ``MaskFormer.forward`` makes: pre-processing, backbone, pixel decoder, transformer decoder,
semantic inference with resizing) is counted and timed on its own; "all" is the whole
``model(inputs)``. Medians of ``--repeats`` runs after one warm-up.

``--train``: the training step of ``bench_vs_official.py`` (batch 2 of 256x256, 3 masks each,
the project's optimizer recipe). Each component runs forward and backward on its own, from the
previous component's outputs detached into leaves (backward of the sum of its outputs: the same
products as with the real upstream gradients, except the transformer decoder's mask logits,
whose backward the losses make sparse: the component runs it dense, the whole step as in
training); "losses" is the matcher, the criterion and their backward, "optimizer" the clipped
AdamW step. "all" is the whole step (``model(batch)``, backward
of the summed losses, optimizer step).

The process runs with the project's CPU runtime settings (FLUSH_DENORMALS, REUSE_HOST_MEMORY),
as ``train_net.py`` does.

``--profile``: afterwards, one more whole run under ``torch.profiler``: the matrix products' time
and GFLOP/s per operator, the product shapes that lose the most time against the measured rate,
and the operators with the most self time. The profiler inflates memory-bound operators on this
kind of machine, so its figures say where to look, the timed components what things cost.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_vs_official import training_batch
from detectron2.modeling import build_model
from torch.utils.flop_counter import FlopCounterMode

from dinat import add_dinat_config
from mask2former.engine import build_cfg, build_optimizer, setup_cpu_runtime
from semask import add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"


def swin_t_cfg(opts=()):
    """The benchmarked Swin-T config (CPU, random init, ``opts`` on top), with the project's
    CPU runtime settings applied to this process, as ``train_net.py`` and the prediction tool
    do."""
    cfg = build_cfg(
        str(CONFIG),
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts],
        (add_semask_config, add_dinat_config),
    )
    setup_cpu_runtime(cfg)
    return cfg


def matmul_rate(dtype, sizes=(512, 1024, 2048), repeats=5):
    """GFLOP/s of ``n x n @ n x n`` products: the best over ``sizes`` of the median run."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def pieces(model, inputs):
    """The eval-mode forward as named steps, each a function of the previous step's result
    (the same calls as ``MaskFormer.forward`` makes)."""
    head = model.sem_seg_head
    state = {}

    def preprocess():
        state["images"] = model.preprocess_image(inputs)

    def backbone():
        state["features"] = model.backbone(state["images"].tensor)

    def pixel_decoder():
        state["mask_features"], _, state["multi_scale"] = head.pixel_decoder.forward_features(
            state["features"]
        )

    def transformer_decoder():
        state["outputs"] = head.predictor(state["multi_scale"], state["mask_features"])

    def semantic_inference():
        model.inference(state["outputs"], inputs, state["images"])

    return {
        "preprocess": preprocess,
        "backbone": backbone,
        "pixel decoder": pixel_decoder,
        "transformer decoder": transformer_decoder,
        "semantic inference": semantic_inference,
    }


def count_and_time(steps, whole, repeats):
    """GFLOPs of each of ``steps`` (name -> function) and median seconds of each and of
    ``whole`` (the same work in one call, "all") over ``repeats`` runs, after one warm-up run of
    ``whole`` (which fills the geometry caches and, in training, the optimizer state)."""
    flops, times = {}, {name: [] for name in [*steps, "all"]}
    whole()
    for name, step in steps.items():
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops[name] = counter.get_total_flops() / 1e9
    for _ in range(repeats):
        start = time.perf_counter()
        whole()
        times["all"].append(time.perf_counter() - start)
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    flops["all"] = sum(flops.values())
    return flops, {name: statistics.median(values) for name, values in times.items()}


def measure(model, inputs, repeats):
    """GFLOPs and median seconds of each step, and of the whole ``model(inputs)``."""
    with torch.no_grad():
        return count_and_time(pieces(model, inputs), lambda: model(inputs), repeats)


def _leaves(outputs):
    """``outputs`` (tensors in dicts, lists, tuples) with every float tensor detached into a
    leaf that requires a gradient."""
    if isinstance(outputs, torch.Tensor):
        leaf = outputs.detach()
        return leaf.requires_grad_() if leaf.is_floating_point() else leaf
    if isinstance(outputs, dict):
        return {k: _leaves(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_leaves(v) for v in outputs)
    return outputs


def _sum(outputs) -> torch.Tensor:
    """Sum of every float tensor in ``outputs`` that requires a gradient."""
    if isinstance(outputs, torch.Tensor):
        return outputs.sum() if outputs.requires_grad else outputs.new_zeros(())
    values = outputs.values() if isinstance(outputs, dict) else outputs
    parts = [_sum(v) for v in values if isinstance(v, (torch.Tensor, dict, list, tuple))]
    return sum(parts, torch.zeros(()))


def training_pieces(model, batch, optimizer):
    """The training step as named steps, each forward + backward of one component from the
    previous step's detached outputs (see the module docstring)."""
    head = model.sem_seg_head
    state = {}

    def backbone():
        state["images"] = model.preprocess_image(batch)
        features = model.backbone(state["images"].tensor)
        _sum(features).backward()
        state["features"] = _leaves(features)

    def pixel_decoder():
        outputs = head.pixel_decoder.forward_features(state["features"])
        _sum(outputs).backward()
        state["mask_features"], _, state["multi_scale"] = _leaves(outputs)

    def transformer_decoder():
        outputs = head.predictor(state["multi_scale"], state["mask_features"])
        _sum(outputs).backward()
        state["outputs"] = _leaves(outputs)

    def losses():
        terms = model.losses(state["outputs"], state["features"], batch, state["images"])
        sum(terms.values()).backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "backbone": backbone,
        "pixel decoder": pixel_decoder,
        "transformer decoder": transformer_decoder,
        "losses": losses,
        "optimizer": optimizer_step,
    }


def training_step(model, batch, optimizer):
    """The whole training step as a function: ``model(batch)``, backward of the summed
    losses, optimizer step."""

    def step():
        sum(model(batch).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_training(model, batch, optimizer, repeats):
    """GFLOPs (forward + backward) and median seconds of each training step component, and of
    the whole step."""
    whole = training_step(model, batch, optimizer)
    return count_and_time(training_pieces(model, batch, optimizer), whole, repeats)


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_run(run, rate, top=12):
    """Print where one call of ``run`` spends its time, by ``torch.profiler`` (see the module
    docstring): matrix products per operator and per shape, then operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        run()
    by_op, by_shape = {}, {}
    for event in prof.events():
        if event.name not in MATRIX_PRODUCTS:
            continue
        seconds, gflop = event.self_cpu_time_total / 1e6, (event.flops or 0) / 1e9
        for table, key in ((by_op, event.name), (by_shape, (event.name, str(event.input_shapes)))):
            entry = table.setdefault(key, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds
            entry[2] += gflop
    print(f"\nmatrix products under torch.profiler (rate {rate:.1f} GFLOP/s):")
    print(f"{'operator':<16}{'calls':>7}{'s':>9}{'GFLOP':>9}{'GFLOP/s':>9}")
    for name, (calls, seconds, gflop) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<16}{calls:>7}{seconds:>9.3f}{gflop:>9.1f}{gflop / seconds:>9.1f}")
    print(f"\nshapes losing the most time against {rate:.1f} GFLOP/s:")
    lost = {key: seconds - gflop / rate for key, (_, seconds, gflop) in by_shape.items()}
    for key in sorted(lost, key=lost.get, reverse=True)[:top]:
        calls, seconds, gflop = by_shape[key]
        print(
            f"  {lost[key]:7.3f} s lost  {calls:4d} x {key[0]} {key[1]}: {seconds:.3f} s, "
            f"{gflop / seconds:.1f} GFLOP/s"
        )
    print("\noperators by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    p.add_argument("--size", type=int, default=512, help="image side")
    p.add_argument("--bf16", action="store_true", help="also measure the bf16 matmul rate")
    p.add_argument(
        "--train", action="store_true", help="a training step (batch 2 of 256x256) instead"
    )
    p.add_argument("--profile", action="store_true", help="then one run under torch.profiler")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = swin_t_cfg(["INPUT.MIN_SIZE_TEST", str(args.size)])
    torch.manual_seed(0)
    rate = matmul_rate(torch.float32)
    if args.train:
        model = build_model(cfg).train()
        optimizer = build_optimizer(cfg, model)
        batch = training_batch(torch)
        flops, times = measure_training(model, batch, optimizer, args.repeats)
        whole = training_step(model, batch, optimizer)
        what = "training step, batch 2 of 256x256, forward + backward"
    else:
        # no parameter needs a gradient here (FlopCounterMode's module tracker would hook them)
        model = build_model(cfg).eval().requires_grad_(False)
        image = torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8)
        inputs = [{"image": image, "height": args.size, "width": args.size}]
        flops, times = measure(model, inputs, args.repeats)

        def whole():
            with torch.no_grad():
                model(inputs)

        what = f"{args.size}x{args.size}"
    rate = max(rate, matmul_rate(torch.float32))  # the rate drifts while the machine is shared

    print(
        f"Mask2Former Swin-T, {what}, fp32, {torch.get_num_threads()} threads; "
        f"matrix-product rate {rate:.1f} GFLOP/s"
    )
    if args.bf16:
        bf16 = matmul_rate(torch.bfloat16, sizes=(512, 1024))
        print(f"bf16 matrix-product rate {bf16:.1f} GFLOP/s")
    print(f"{'step':<22}{'GFLOP':>8}{'measured s':>12}{'floor s':>10}{'of floor':>10}")
    for name in flops:
        floor = flops[name] / rate
        ratio = f"{times[name] / floor:>9.2f}x" if floor > 0 else f"{'-':>10}"
        print(f"{name:<22}{flops[name]:>8.1f}{times[name]:>12.3f}{floor:>10.3f}{ratio}")
    if args.profile:
        profile_run(whole, rate)


if __name__ == "__main__":
    main()
