#!/usr/bin/env python
"""Neighborhood attention on CPU: one DiNAT layer's attention, and DiNAT-L Mask2Former inference.

    python benchmarks/bench_neighborhood_attention.py [--repeats 3] [--threads N]
        [--natten] [--skip-reference] [--skip-model] [--train] [--compile] [--bf16]

Layer: 128x128 tokens, 6 heads, head dim 32, kernel 11 (DiNAT-L level 0 at 512 px), dilation 1
and 4, fp32, forward only (``--train`` adds forward + backward of the tiled path):

* tiled      - ``na2d_tiled`` (this project's CPU path), with and without the rpb;
* reference  - ``na2d_reference``, the naive gather-all-neighbours path (about 3 GB of memory);
* NATTEN     - ``natten.functional.na2d`` 0.21.7 (no rpb; on CPU it runs through uncompiled flex
               attention, ~50 s per call here), once, only with ``--natten``;
* compiled   - with ``--compile``, ``na2d_tiled`` with rpb through ``torch.compile`` (what
               ``MODEL.COMPILE`` does to it), compiled in its untimed warm-up (seconds printed),
               with its largest difference to the eager result.

``--bf16``: the layer under ``torch.autocast("cpu", torch.bfloat16)`` with bfloat16 queries, keys
and values (as ``MODEL.PRECISION bf16``'s projections make them; the rpb stays float32);
meaningful only on CPUs with AVX512-BF16 / AMX. ``--train``'s rows stay float32.

Model (``--skip-model`` to leave out): Mask2Former with DiNAT-L (configs/m2f_dinat_l.yaml), random
init, one 512x512 image, 11 classes, fp32, split into backbone and the rest.
Figures are medians over ``--repeats`` runs after one warm-up run (NATTEN: a single run).
"""

import argparse
import contextlib
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from dinat.neighborhood_attention import na2d_natten, na2d_reference, na2d_tiled

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_dinat_l.yaml"
SIZE, HEADS, HEAD_DIM, KERNEL = 128, 6, 32, 11


def timed(fn, repeats, warmup=True):
    """Median wall-clock and process-CPU seconds of ``fn()``."""
    if warmup:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def layer_inputs(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shape = (1, SIZE, SIZE, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_(requires_grad) for _ in range(3))
    rpb = torch.randn(HEADS, 2 * KERNEL - 1, 2 * KERNEL - 1, generator=g) * 0.02
    return q, k, v, rpb.requires_grad_(requires_grad)


def bench_layer(args):
    rows = []
    q, k, v, rpb = layer_inputs()
    precision = contextlib.nullcontext()
    if args.bf16:
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        precision = torch.autocast("cpu", dtype=torch.bfloat16)

    def run(name, fn, has_rpb, dilation, repeats=args.repeats, warmup=True):
        rows.append((name, dilation, has_rpb, *timed(fn, repeats, warmup)))

    for d in (1, 4):
        with torch.no_grad(), precision:
            run("tiled", partial(na2d_tiled, q, k, v, rpb, KERNEL, d), "yes", d)
            if args.compile:
                compiled = torch.compile(partial(na2d_tiled, kernel_size=KERNEL, dilation=d))
                start = time.perf_counter()
                out = compiled(q, k, v, rpb)
                seconds = time.perf_counter() - start
                diff = (out.float() - na2d_tiled(q, k, v, rpb, KERNEL, d).float()).abs().max()
                print(
                    f"dilation {d}: compiled in {seconds:.1f} s, max |compiled - eager| {diff:.2e}"
                )
                run("tiled, compiled", partial(compiled, q, k, v, rpb), "yes", d)
            run("tiled", partial(na2d_tiled, q, k, v, None, KERNEL, d), "no", d)
            if not args.skip_reference:
                naive = partial(na2d_reference, q, k, v, rpb, KERNEL, d)
                run("reference (naive)", naive, "yes", d, max(1, args.repeats // 2), False)
            if args.natten:
                natten = partial(na2d_natten, q, k, v, None, KERNEL, d)
                run("NATTEN 0.21.7 na2d", natten, "no", d, 1, False)
        if args.train:
            qg, kg, vg, rpbg = layer_inputs(requires_grad=True)
            grad = torch.randn(qg.shape)

            def step(dilation=d):
                na2d_tiled(qg, kg, vg, rpbg, KERNEL, dilation).backward(grad)

            run("tiled fwd+bwd", step, "yes", d)
    print(
        f"\nNeighborhood attention, {SIZE}x{SIZE} tokens, {HEADS} heads, head dim {HEAD_DIM}, "
        f"kernel {KERNEL}, {'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    print(f"  {'implementation':<22} {'dilation':>8} {'rpb':>4} {'median s':>9} {'cpu s':>7}")
    for name, dilation, has_rpb, wall, cpu in rows:
        print(f"  {name:<22} {dilation:>8} {has_rpb:>4} {wall:>9.3f} {cpu:>7.3f}")
    if not args.natten:
        print("  (NATTEN 0.21.7 na2d not run: ~50 s per call on this CPU; pass --natten)")


def bench_model(args):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    from dinat import add_dinat_config
    from mask2former import add_maskformer2_config

    # Registers MaskFormer and its pixel decoder.
    from mask2former.modeling import meta_arch, pixel_decoder  # noqa: F401

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_dinat_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    image = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    inputs = [{"image": image, "height": 512, "width": 512}]
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        total = timed(lambda: model(inputs), args.repeats)
        backbone = timed(lambda: model.backbone(images.tensor), args.repeats)
    print(f"\nMask2Former DiNAT-L ({params:.0f} M parameters, random init), 512x512 image, fp32")
    print(f"  {'part':<22} {'median s':>9} {'cpu s':>7}")
    print(f"  {'total (model forward)':<22} {total[0]:>9.3f} {total[1]:>7.3f}")
    print(f"  {'backbone':<22} {backbone[0]:>9.3f} {backbone[1]:>7.3f}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    parser.add_argument("--natten", action="store_true", help="also run NATTEN's na2d once (slow)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the naive path")
    parser.add_argument("--skip-model", action="store_true", help="leave out DiNAT-L Mask2Former")
    parser.add_argument("--train", action="store_true", help="also time tiled forward + backward")
    parser.add_argument("--compile", action="store_true", help="also time the compiled tiled path")
    parser.add_argument("--bf16", action="store_true", help="the layer under bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    bench_layer(args)
    if not args.skip_model:
        bench_model(args)


if __name__ == "__main__":
    main()
