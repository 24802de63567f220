#!/usr/bin/env python
"""Mask2Former Swin-T on CPU (fp32): inference latency and training-step time, per component.

    python benchmarks/bench_mask2former.py [--repeats 5] [--threads N] [--skip-train] [--profile]

Config: configs/m2f_swin_t.yaml (Base-Trash-Semantic + Swin-T), 11 classes, random init.
Inference: one 512x512 image. Training: batch 2 of 256x256, forward + backward + AdamW step.
Reference of the official implementation on this machine: 2.7 s inference, 4.5 s per
training step; 2.4 s of inference split as backbone 0.57, pixel decoder 1.41, transformer
decoder 0.30, upsampling + semantic inference 0.15.
Figures are medians over ``--repeats`` runs after one warm-up run.
"""

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.structures import Instances
from torch.nn import functional as F

from mask2former.config import add_maskformer2_config
from mask2former.modeling.backbone import swin  # noqa: F401  (registers D2SwinTransformer)
from mask2former.modeling.meta_arch import semantic_inference_naive
from mask2former.modeling.pixel_decoder import msdeformattn  # noqa: F401  (registers it)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"


class Timer:
    """Collects wall-clock times per named section over several runs."""

    def __init__(self):
        self.times = {}

    @contextmanager
    def section(self, name):
        start = time.perf_counter()
        yield
        self.times.setdefault(name, []).append(time.perf_counter() - start)

    def median(self, name):
        return statistics.median(self.times[name])


def build(cfg_opts):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(cfg_opts))
    torch.manual_seed(0)
    return build_model(cfg)


def synthetic_training_input(seed, size):
    """A random image with a few rectangular class regions (one mask per present class)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(size, size, dtype=torch.int64)
    for cls in torch.randint(1, 11, (4,), generator=g).tolist():
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
        label[y0 : y0 + h, x0 : x0 + w] = cls
    classes = label.unique()
    instances = Instances((size, size))
    instances.gt_classes = classes
    instances.gt_masks = torch.stack([label == c for c in classes])
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    return {"image": image, "sem_seg": label, "instances": instances, "height": size, "width": size}


def official_semantic_inference(mask_cls, mask_pred, padded_size, image_size, output_size):
    """The official procedure (upsample all masks, einsum, postprocess), for comparison."""
    up = F.interpolate(mask_pred[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(semantic_inference_naive(mask_cls, up), image_size, *output_size)


def bench_inference(model, repeats):
    model.eval()
    image = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    inputs = [{"image": image, "height": 512, "width": 512}]
    head = model.sem_seg_head
    timer = Timer()
    with torch.no_grad():
        for run in range(repeats + 1):
            t = Timer() if run == 0 else timer
            with t.section("total (model forward)"):
                model(inputs)
            with t.section("preprocess"):
                images = model.preprocess_image(inputs)
            with t.section("backbone"):
                features = model.backbone(images.tensor)
            with t.section("pixel decoder"):
                mask_features, _, multi_scale = head.pixel_decoder.forward_features(features)
            with t.section("transformer decoder"):
                outputs = head.predictor(multi_scale, mask_features)
            with t.section("upsampling + semantic inference"):
                model.inference(outputs, inputs, images)
            with t.section("  (official upsampling + einsum)"):
                size = (512, 512)
                official_semantic_inference(
                    outputs["pred_logits"][0], outputs["pred_masks"][0], size, size, size
                )
    return timer


def bench_training(model, repeats):
    model.train()
    samples = [synthetic_training_input(i, 256) for i in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    head = model.sem_seg_head
    timer = Timer()
    for run in range(repeats + 1):
        t = Timer() if run == 0 else timer
        with t.section("total step (fwd + bwd + AdamW)"):
            losses = model(samples)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        # the same step again, section by section
        with t.section("preprocess + targets"):
            images = model.preprocess_image(samples)
            targets = model.prepare_targets([s["instances"] for s in samples], images)
        with t.section("backbone"):
            features = model.backbone(images.tensor)
        with t.section("pixel decoder"):
            mask_features, _, multi_scale = head.pixel_decoder.forward_features(features)
        with t.section("transformer decoder"):
            outputs = head.predictor(multi_scale, mask_features)
        with t.section("criterion (matching + losses)"):
            losses = model.criterion(outputs, targets)
        with t.section("  (of which matching, all sets)"):
            for predictions in [outputs] + outputs["aux_outputs"]:
                model.criterion.matcher(predictions, targets)
        with t.section("backward"):
            optimizer.zero_grad()
            weights = model.criterion.weight_dict
            sum(v * weights[k] for k, v in losses.items() if k in weights).backward()
        with t.section("AdamW step"):
            optimizer.step()
    return timer


def print_table(title, timer, reference=None):
    print(f"\n{title}")
    header = f"  {'component':<36} {'median s':>9} {'min s':>8}"
    print(header + (f" {'official s':>11}" if reference else ""))
    for name, values in timer.times.items():
        line = f"  {name:<36} {statistics.median(values):>9.3f} {min(values):>8.3f}"
        if reference and name in reference:
            line += f" {reference[name]:>11.2f}"
        print(line)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--profile", action="store_true", help="top operators of one inference")
    parser.add_argument("opts", nargs="*", help="extra config KEY VALUE pairs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32 CPU; config {CONFIG.name}")

    model = build(args.opts)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"parameters: {params:.1f} M")
    print_table(
        "Inference, one 512x512 image",
        bench_inference(model, args.repeats),
        {
            "total (model forward)": 2.7,
            "backbone": 0.57,
            "pixel decoder": 1.41,
            "transformer decoder": 0.30,
            "upsampling + semantic inference": 0.15,
        },
    )
    if args.profile:
        inputs = [{"image": torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)}]
        with torch.no_grad(), torch.profiler.profile() as prof:
            model.eval()(inputs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if not args.skip_train:
        print_table(
            "Training step, batch 2 of 256x256",
            bench_training(build(args.opts), args.repeats),
            {"total step (fwd + bwd + AdamW)": 4.5},
        )


if __name__ == "__main__":
    main()
