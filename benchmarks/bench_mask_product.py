#!/usr/bin/env python
"""The transformer decoder's mask product in training, forward + backward: the project's
``mask_logits`` (a backward over the rows with a gradient only) against ``torch.bmm`` with
autograd's dense backward, side by side in one process.

    python benchmarks/bench_mask_product.py [--repeats 20] [--threads 2] [--live 3]
    python benchmarks/bench_mask_product.py --step [--size 256] [--rounds 4] [--repeats 3]

The shapes are those of the Swin-T training step with deep supervision (batch 2, 10 prediction
sets of 100 queries, 256 mask channels) at 256x256 and 512x512 input (64x64 and 128x128 mask
logits). The upstream gradient is the mask losses' pattern: non-zero on ``--live`` matched
queries per prediction set and image, zero elsewhere. Medians after one warm-up; the two are
timed alternately.

``--step``: the whole training step of ``bench_floor.py --train`` (Swin-T, batch 2 of
``--size`` x ``--size``, forward, backward, AdamW; the project's CPU runtime settings) with the
row-skipping backward and with the dense one (``mask_product.SPARSE_ROW_FRACTION`` 0), in one
process: ``--rounds`` rounds alternate the two, each one warm-up and ``--repeats`` timed steps.
"""

import argparse
import statistics
import time

import torch

from mask2former.modeling.transformer_decoder import mask_product
from mask2former.modeling.transformer_decoder.mask_product import mask_logits

SHAPES = {"256x256 input": 64, "512x512 input": 128}


def step(product, embeds, features, grad):
    """One forward and backward of ``product``; seconds."""
    e = embeds.detach().requires_grad_()
    f = features.detach().requires_grad_()
    start = time.perf_counter()
    product(e, f).backward(grad)
    return time.perf_counter() - start


def whole_step(args):
    """Median seconds of the training step with the dense and with the row-skipping backward."""
    from bench_floor import swin_t_cfg, training_step
    from bench_vs_official import training_batch
    from detectron2.modeling import build_model

    from mask2former.engine import build_optimizer

    cfg = swin_t_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = training_batch(torch, size=args.size)
    train_step = training_step(model, batch, build_optimizer(cfg, model))
    fractions = {"dense backward": 0.0, "row-skipping": mask_product.SPARSE_ROW_FRACTION}
    times = {name: [] for name in fractions}
    for _ in range(args.rounds):
        for name, fraction in fractions.items():
            mask_product.SPARSE_ROW_FRACTION = fraction
            train_step()  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                train_step()
                times[name].append(time.perf_counter() - start)
    mask_product.SPARSE_ROW_FRACTION = fractions["row-skipping"]
    dense, sparse = (statistics.median(times[name]) for name in fractions)
    print(
        f"training step, Swin-T, batch 2 of {args.size}x{args.size}, {torch.get_num_threads()} "
        f"threads, medians of {args.rounds} x {args.repeats} steps each"
    )
    print(f"dense backward {dense:.3f} s, row-skipping {sparse:.3f} s: {dense / sparse:.3f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20; --step: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    p.add_argument("--live", type=int, default=3, help="matched queries per set and image")
    p.add_argument("--step", action="store_true", help="time the whole training step instead")
    p.add_argument("--size", type=int, default=256, help="--step: image side")
    p.add_argument("--rounds", type=int, default=4, help="--step: alternations")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        args.repeats = args.repeats or 3
        whole_step(args)
        return
    args.repeats = args.repeats or 20
    batch, sets, queries, channels = 2, 10, 100, 256
    g = torch.Generator().manual_seed(0)
    print(
        f"mask product, batch {batch}, {sets} x {queries} queries, {channels} channels, "
        f"{args.live} live queries per set and image, {torch.get_num_threads()} threads"
    )
    print(f"{'':<16}{'torch.bmm s':>13}{'mask_logits s':>15}{'ratio':>8}")
    for name, side in SHAPES.items():
        embeds = torch.randn(batch, sets * queries, channels, generator=g)
        features = torch.randn(batch, channels, side * side, generator=g)
        grad = torch.zeros(batch, sets * queries, side * side)
        for b in range(batch):
            for s in range(sets):
                rows = s * queries + torch.randperm(queries, generator=g)[: args.live]
                grad[b, rows] = torch.randn(args.live, side * side, generator=g)
        times = {torch.bmm: [], mask_logits: []}
        for product in times:
            step(product, embeds, features, grad)  # warm-up
        for _ in range(args.repeats):
            for product, runs in times.items():
                runs.append(step(product, embeds, features, grad))
        dense, sparse = (statistics.median(times[k]) for k in (torch.bmm, mask_logits))
        print(f"{name:<16}{dense:>13.4f}{sparse:>15.4f}{dense / sparse:>7.2f}x")


if __name__ == "__main__":
    main()
