#!/usr/bin/env python
"""The Hungarian matcher's mask costs and the whole criterion on CPU: the PyTorch path against
the compiled kernel (``HungarianMatcher(impl=...)``), side by side in one run.

    python benchmarks/bench_matcher.py [--repeats 7] [--threads N]

* cost matrix: one image, 100 predicted masks of 64x64, 3 targets of 256x256, 12544 points
  (the Swin-T training step's shapes);
* criterion: forward + backward of the set criterion (matching and losses of the final and the
  9 auxiliary prediction sets) on the predictions of a randomly initialised Mask2Former Swin-T
  for the training batch of ``bench_vs_official.py`` (2 images of 256x256, 3 masks each).

The implementations alternate within each repeat; medians of ``--repeats`` runs after one
warm-up. The outputs are compared (the cost matrices to float32 rounding, the losses to 1e-4).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_vs_official import training_batch
from detectron2.modeling import build_model

from dinat import add_dinat_config
from mask2former.engine import build_cfg
from mask2former.modeling.matcher import HungarianMatcher
from semask import add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"
IMPLS = ("pytorch", "cpu")


def time_alternating(functions, repeats):
    """Median seconds of each of ``functions`` (name -> function), run in turn ``repeats``
    times after one warm-up call each."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title, times):
    base = times["pytorch"]
    for name, seconds in times.items():
        print(f"  {title:<46s}{name:<9s}{seconds * 1e3:9.1f} ms   x{base / seconds:4.2f}")


def bench_cost_matrix(repeats):
    g = torch.Generator().manual_seed(0)
    pred_logits = torch.randn(100, 12, generator=g)
    pred_masks = torch.randn(100, 64, 64, generator=g) * 5
    labels = torch.tensor([1, 4, 7])
    masks = torch.rand(3, 256, 256, generator=g) > 0.5
    matchers = {impl: HungarianMatcher(2.0, 5.0, 5.0, impl=impl) for impl in IMPLS}

    def cost(impl):
        torch.manual_seed(0)  # the same points for both
        return matchers[impl].cost_matrix(pred_logits, pred_masks, labels, masks)

    difference = (cost("pytorch") - cost("cpu")).abs().max().item()
    times = time_alternating({impl: (lambda impl=impl: cost(impl)) for impl in IMPLS}, repeats)
    report("cost matrix, 100 masks x 3 targets, 12544 pts", times)
    print(f"  max |cpu - pytorch| = {difference:.2e}")


def bench_criterion(repeats):
    cfg = build_cfg(
        str(CONFIG),
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""],
        (add_semask_config, add_dinat_config),
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = training_batch(torch)
    images = model.preprocess_image(batch)
    with torch.no_grad():
        outputs = model.sem_seg_head(model.backbone(images.tensor))
    targets = model.prepare_targets([x["instances"] for x in batch], images)
    leaves = [
        {k: v.detach().requires_grad_() for k, v in s.items() if k != "aux_outputs"}
        for s in [outputs] + outputs["aux_outputs"]
    ]
    predictions = dict(leaves[0], aux_outputs=leaves[1:])
    criterion = model.criterion

    def step(impl):
        criterion.matcher.impl = impl
        torch.manual_seed(0)
        losses = criterion(predictions, targets)
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}

    first, second = step("pytorch"), step("cpu")
    difference = max(abs(first[k] - second[k]) for k in first)
    times = time_alternating({impl: (lambda impl=impl: step(impl)) for impl in IMPLS}, repeats)
    report("criterion fwd + bwd, 10 prediction sets", times)
    print(f"  max |loss cpu - loss pytorch| = {difference:.2e} over {len(first)} losses")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    bench_cost_matrix(args.repeats)
    bench_criterion(args.repeats)


if __name__ == "__main__":
    main()
