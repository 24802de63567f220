#!/usr/bin/env python
"""Inference precision and compilation: fp32 vs bf16 (MODEL.PRECISION) vs compiled
(MODEL.COMPILE) Mask2Former on CPU, and the bf16 vs fp32 argmax agreement.

    python benchmarks/bench_precision.py [--config-file C] [--size 512] [--repeats 3]
        [--variants fp32,bf16,compile] [--threads N]
        [--weights W --dataset D [--limit N]] [KEY VALUE ...]

Timing: one synthetic --size x --size image; every variant runs once to warm up (the compiled
one compiles then; its compile time is printed), then the variants run in turn (A, B, C, A, B,
C, ...) --repeats times; medians of wall-clock and of process CPU seconds, and their ratios to
fp32. Agreement: without weights, over the pixels of the synthetic image (random init); with
--weights and a registered --dataset (e.g. DATASETS.LABELMAP_SEMSEG with the CamVid val images),
over all pixels of the dataset, predicted as tools/predict.py does (no TTA), with its CPU
runtime settings (FLUSH_DENORMALS, REUSE_HOST_MEMORY). Default config: configs/m2f_swin_t.yaml
(Swin-T, 11 classes, official ADE20K semantic shape).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from dinat import add_dinat_config
from mask2former.data import register_datasets_from_cfg
from mask2former.engine import SafeCheckpointer, build_cfg, setup_cpu_runtime
from mask2former.inference.predictor import SemSegPredictor, iterate_images
from semask import add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"
# variant name -> config overrides
VARIANTS = {
    "fp32": ["MODEL.PRECISION", "fp32", "MODEL.COMPILE", "False"],
    "bf16": ["MODEL.PRECISION", "bf16", "MODEL.COMPILE", "False"],
    "compile": ["MODEL.PRECISION", "fp32", "MODEL.COMPILE", "True"],
    "bf16+compile": ["MODEL.PRECISION", "bf16", "MODEL.COMPILE", "True"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=str(CONFIG))
    p.add_argument("--size", type=int, default=512, help="side of the synthetic timing image")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--variants", default="fp32,bf16,compile", help=f"of {sorted(VARIANTS)}")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--weights", default="", help="weights file (default: random init)")
    p.add_argument("--dataset", default="", help="registered dataset for the agreement")
    p.add_argument("--limit", type=int, default=0, help="first N images of --dataset (0: all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "fp32" not in args.variants:
        p.error(f"--variants: names from {sorted(VARIANTS)}, fp32 included; got {args.variants}")
    if args.dataset and not args.weights:
        p.error("--dataset needs --weights (the agreement of random weights is not meaningful)")
    return args


def build_models(args):
    """One model per variant, all with the fp32 model's weights; and the config."""
    models, cfg = {}, None
    for name in args.variants:
        cfg = build_cfg(
            args.config_file,
            ["MODEL.DEVICE", "cpu", *args.opts, *VARIANTS[name]],
            (add_semask_config, add_dinat_config),
        )
        setup_cpu_runtime(cfg)  # as the prediction tool does
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        if args.weights:
            SafeCheckpointer(
                model, allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION
            ).load_for_inference(args.weights)
        elif models:  # random init: the weights of the first variant
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[name] = model
    return models, cfg


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def bench_speed(models, size, repeats):
    """Interleaved timings on one synthetic image; returns {name: (wall, cpu)} medians and the
    synthetic image's scores per variant."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    inputs = [{"image": image, "height": size, "width": size}]
    scores = {}
    for name, model in models.items():
        out, wall, cpu = timed(lambda: model(inputs)[0]["sem_seg"])
        scores[name] = out
        print(f"warm-up {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    times = {name: ([], []) for name in models}
    for round_ in range(repeats):
        for name, model in models.items():
            _, wall, cpu = timed(lambda: model(inputs))
            times[name][0].append(wall)
            times[name][1].append(cpu)
        print(f"round {round_ + 1}/{repeats} done", flush=True)
    return {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}, scores


def agreement(a, b):
    return (a.argmax(0) == b.argmax(0)).sum().item(), a[0].numel()


@torch.no_grad()
def dataset_agreement(cfg, models, dataset, limit):
    """bf16 vs fp32 argmax agreement over all pixels of ``dataset`` (no TTA)."""
    records = DatasetCatalog.get(dataset)
    records = records[:limit] if limit > 0 else records
    fp32 = SemSegPredictor(cfg, models["fp32"], tta=False)
    bf16 = SemSegPredictor(cfg, models["bf16"], tta=False)
    same = total = 0
    for _, image in iterate_images(records, cfg.INPUT.FORMAT):
        s, n = agreement(fp32(image), bf16(image))
        same, total = same + s, total + n
    return same, total, len(records)


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models, cfg = build_models(args)
    print(
        f"config {args.config_file}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
        f"{'weights ' + args.weights if args.weights else 'random init'}"
    )
    medians, scores = bench_speed(models, args.size, args.repeats)
    wall0, cpu0 = medians["fp32"]
    print(f"\n{'variant':<14}{'wall s':>9}{'CPU s':>9}{'wall / fp32':>13}{'CPU / fp32':>12}")
    for name, (wall, cpu) in medians.items():
        print(f"{name:<14}{wall:>9.2f}{cpu:>9.2f}{wall / wall0:>13.3f}{cpu / cpu0:>12.3f}")
    print("\nagreement with fp32 on the synthetic image (argmax pixels; max |score diff|):")
    for name, out in scores.items():
        if name != "fp32":
            same, total = agreement(scores["fp32"], out)
            diff = (out - scores["fp32"]).abs().max().item()
            print(f"  {name}: {same / total:.6f} of {total} pixels; {diff:.2e}")
    if args.dataset:
        if "bf16" not in models:
            raise SystemExit("--dataset agreement needs the bf16 variant in --variants")
        register_datasets_from_cfg(cfg)
        same, total, images = dataset_agreement(cfg, models, args.dataset, args.limit)
        print(
            f"\n{args.dataset}: bf16 vs fp32 argmax agreement {same / total:.6f} "
            f"({total - same} of {total} pixels differ, {images} images)"
        )


if __name__ == "__main__":
    main()
