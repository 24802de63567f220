#!/usr/bin/env python
"""SeMask-L Mask2Former on CPU (fp32): inference latency of one 512x512 image, per component.

    python benchmarks/bench_semask.py [--repeats 3] [--threads N] [KEY VALUE ...]

Config: configs/semask_swin_l.yaml (Base-Trash-Semantic + SeMask Swin-L, semantic window 12,
one semantic-attention block per stage), 11 classes, random init. The semantic layers' share of
the backbone time is measured with forward hooks. Figures are medians over ``--repeats`` runs
after one warm-up run.
"""

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from detectron2.modeling import build_model

from mask2former.engine import build_cfg, setup_cpu_runtime
from semask import SemanticLayer, add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "semask_swin_l.yaml"


class Timer:
    """Wall-clock times per named section over several runs."""

    def __init__(self):
        self.times = {}

    def add(self, name, seconds):
        self.times.setdefault(name, []).append(seconds)

    @contextmanager
    def section(self, name):
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start)


def time_semantic_layers(model):
    """Forward hooks summing the time spent in the backbone's semantic layers per forward."""
    state = {"start": 0.0, "total": 0.0}

    def pre_hook(module, args):
        state["start"] = time.perf_counter()

    def post_hook(module, args, output):
        state["total"] += time.perf_counter() - state["start"]

    for module in model.backbone.modules():
        if isinstance(module, SemanticLayer):
            module.register_forward_pre_hook(pre_hook)
            module.register_forward_hook(post_hook)
    return state


def bench_inference(model, repeats):
    model.eval()
    inputs = [
        {
            "image": torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8),
            "height": 512,
            "width": 512,
        }
    ]
    head = model.sem_seg_head
    semantic = time_semantic_layers(model)
    timer = Timer()
    with torch.no_grad():
        for run in range(repeats + 1):
            t = Timer() if run == 0 else timer
            with t.section("total (model forward)"):
                model(inputs)
            images = model.preprocess_image(inputs)
            semantic["total"] = 0.0
            with t.section("backbone"):
                features = model.backbone(images.tensor)
            t.add("  (of which semantic layers)", semantic["total"])
            with t.section("pixel decoder"):
                mask_features, _, multi_scale = head.pixel_decoder.forward_features(features)
            with t.section("transformer decoder"):
                outputs = head.predictor(multi_scale, mask_features)
            with t.section("upsampling + semantic inference"):
                model.inference(outputs, inputs, images)
    return timer


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: default)"
    )
    parser.add_argument("opts", nargs="*", help="extra config KEY VALUE pairs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_cfg(str(CONFIG), ["MODEL.DEVICE", "cpu"] + list(args.opts), (add_semask_config,))
    setup_cpu_runtime(cfg)  # as the prediction tool does
    torch.manual_seed(0)
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, fp32 CPU; config {CONFIG.name}"
    )
    print(f"parameters: {params:.1f} M")
    timer = bench_inference(model, args.repeats)
    print("\nInference, one 512x512 image (random init)")
    print(f"  {'component':<36} {'median s':>9} {'min s':>8}")
    for name, values in timer.times.items():
        print(f"  {name:<36} {statistics.median(values):>9.3f} {min(values):>8.3f}")


if __name__ == "__main__":
    main()
