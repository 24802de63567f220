#!/usr/bin/env python
"""The heads' 1x1 convolutions as matrix products (``PointwiseConv2d``) against the convolution
library (``F.conv2d``), on CPU.

    python benchmarks/bench_pointwise_conv.py [--rounds 6] [--threads 2] [--skip-model]

Layers: one 1x1 convolution of each shape the heads use (Swin-T, 512x512 inference: 96 -> 256
at 1/4 scale and 256 -> 256 at 1/4; the training batch of ``bench_vs_official.py``: 256 -> 256
at 64x64, batch 2), fp32 forward, fp32 forward + backward and forward under bf16 autocast,
medians of 8 runs each, with the largest difference between the two.

Model (``--skip-model`` to leave out): Mask2Former Swin-T (configs/m2f_swin_t.yaml, random
init, seed 0) as built, and the same model with every ``PointwiseConv2d`` replaced by
Detectron2's ``Conv2d`` holding the same parameters (the code before the change); both timed
in one process, alternating, ``--rounds`` times: eval-mode inference of one 512x512 image in
fp32 and under ``MODEL.PRECISION bf16``, and the training step of ``bench_vs_official.py``
(batch 2 of 256x256, forward + backward + AdamW). Medians; the largest difference of the
semantic-segmentation outputs.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from bench_vs_official import training_batch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from torch.nn import functional as F

from dinat import add_dinat_config
from mask2former.engine import build_cfg, build_optimizer
from mask2former.modeling.layers import PointwiseConv2d, pointwise_conv2d
from semask import add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"
# (input shape, output channels) of the heads' 1x1 convolutions timed on their own
LAYER_SHAPES = [((1, 96, 128, 128), 256), ((1, 256, 128, 128), 256), ((2, 256, 64, 64), 256)]


def median_ms(fn, runs: int = 8) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def header(first: str, unit: str) -> str:
    columns = f"{'F.conv2d ' + unit:>12}{'product ' + unit:>12}{'ratio':>8}{'max diff':>10}"
    return f"{first:<36}{columns}"


def time_layers():
    print(header("one 1x1 convolution", "ms"))
    for shape, out_channels in LAYER_SHAPES:
        x = torch.randn(*shape, requires_grad=True)
        weight = torch.randn(out_channels, shape[1], 1, 1, requires_grad=True)
        bias = torch.randn(out_channels, requires_grad=True)
        grad = torch.randn(shape[0], out_channels, *shape[2:])
        both = {"F.conv2d": F.conv2d, "product": pointwise_conv2d}
        label = f"{shape[1]}->{out_channels} at {'x'.join(map(str, shape))}"
        for mode in ("fp32", "fp32 fwd+bwd", "bf16"):
            times, outs = {}, {}
            for name, conv in both.items():
                if mode == "fp32 fwd+bwd":
                    times[name] = median_ms(lambda: conv(x, weight, bias).backward(grad))
                    continue
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
                    times[name] = median_ms(lambda: conv(x, weight, bias))
                    outs[name] = conv(x, weight, bias).float()
            diff = (outs["F.conv2d"] - outs["product"]).abs().max().item() if outs else float("nan")
            old, new = times["F.conv2d"], times["product"]
            print(
                f"{label + ', ' + mode:<36}{old:>12.1f}{new:>12.1f}{new / old:>8.2f}{diff:>10.2g}"
            )


def with_library_convs(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``PointwiseConv2d`` replaced by Detectron2's ``Conv2d``
    with the same parameters, norm and activation."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, PointwiseConv2d):
            continue
        conv = Conv2d(
            module.in_channels,
            module.out_channels,
            kernel_size=1,
            bias=module.bias is not None,
            norm=module.norm,
            activation=module.activation,
        )
        conv.load_state_dict(module.state_dict())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, conv)
    return model


def time_model(rounds: int):
    def build(precision):
        cfg = build_cfg(
            str(CONFIG),
            ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.PRECISION", precision],
            (add_semask_config, add_dinat_config),
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        return cfg, {"F.conv2d": with_library_convs(model), "product": model}

    image = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    inputs = [{"image": image, "height": 512, "width": 512}]
    rows = []
    for precision in ("fp32", "bf16"):
        _, models = build(precision)
        times, outs = {name: [] for name in models}, {}
        with torch.no_grad():
            for name, model in models.items():  # warm-up: two runs each
                outs[name] = model.eval()(inputs)[0]["sem_seg"]
                model(inputs)
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(inputs)
                    times[name].append(time.perf_counter() - start)
        diff = (outs["F.conv2d"] - outs["product"]).abs().max().item()
        rows.append((f"inference 512x512, {precision}", times, diff))

    cfg, models = build("fp32")
    batch = training_batch(torch)
    steps, times = {}, {name: [] for name in models}
    for name, model in models.items():
        optimizer = build_optimizer(cfg, model.train())

        def step(model=model, optimizer=optimizer):
            sum(model(batch).values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
        step()  # warm-up (optimizer state)
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows.append(("training step, 2 x 256x256", times, float("nan")))

    print("\n" + header("Mask2Former Swin-T", "s"))
    for label, times, diff in rows:
        old, new = (statistics.median(times[name]) for name in ("F.conv2d", "product"))
        print(f"{label:<36}{old:>12.3f}{new:>12.3f}{new / old:>8.3f}{diff:>10.2g}")
    print(f"(medians of {rounds} rounds, the two models alternating in one process)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds of the model comparison")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--skip-model", action="store_true", help="only the single layers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads")
    time_layers()
    if not args.skip_model:
        time_model(args.rounds)


if __name__ == "__main__":
    main()
