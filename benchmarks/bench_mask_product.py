#!/usr/bin/env python
"""The transformer decoder's mask product in training, forward + backward: the project's
``mask_logits`` (a backward over the rows with a gradient only) against ``torch.bmm`` with
autograd's dense backward, side by side in one process.

    python benchmarks/bench_mask_product.py [--repeats 20] [--threads 2] [--live 3]

The shapes are those of the Swin-T training step with deep supervision (batch 2, 10 prediction
sets of 100 queries, 256 mask channels) at 256x256 and 512x512 input (64x64 and 128x128 mask
logits). The upstream gradient is the mask losses' pattern: non-zero on ``--live`` matched
queries per prediction set and image, zero elsewhere. Medians after one warm-up; the two are
timed alternately.
"""

import argparse
import statistics
import time

import torch

from mask2former.modeling.transformer_decoder.mask_product import mask_logits

SHAPES = {"256x256 input": 64, "512x512 input": 128}


def step(product, embeds, features, grad):
    """One forward and backward of ``product``; seconds."""
    e = embeds.detach().requires_grad_()
    f = features.detach().requires_grad_()
    start = time.perf_counter()
    product(e, f).backward(grad)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    p.add_argument("--live", type=int, default=3, help="matched queries per set and image")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
