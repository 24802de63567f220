#!/usr/bin/env python
"""ONNX Runtime vs PyTorch CPU latency of the Swin-T Mask2Former on one 512x512 image.

    python benchmarks/bench_onnx.py [--size 512] [--repeats 5] [--threads N] [KEY VALUE ...]

Config: configs/m2f_swin_t.yaml with MODEL.WEIGHTS "" (random init, 11 classes). The model is
exported with :func:`mask2former.export.export_onnx` to a temporary file, then one image goes
through, in turn, PyTorch with the config's own implementations (what tools/predict.py runs),
PyTorch with the export's implementations (the graph that was exported) and ONNX Runtime (CPU
execution provider); all three return the calibrated probabilities [1, K, H, W]. Printed:
medians over ``--repeats`` interleaved rounds after one warm-up round, and the ONNX Runtime vs
PyTorch agreement.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from detectron2.modeling import build_model

from dinat import add_dinat_config
from mask2former.engine.setup import build_cfg
from mask2former.export import ProbabilityModel, compare_onnx, export_config, export_onnx
from semask import add_semask_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2f_swin_t.yaml"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="0: the libraries' defaults")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *args.opts]
    cfg = build_cfg(str(CONFIG), opts, (add_semask_config, add_dinat_config))
    torch.manual_seed(0)
    native = build_model(cfg).eval()
    exported = build_model(export_config(cfg)).eval()
    exported.load_state_dict(native.state_dict())
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        wrapper = export_onnx(exported, path, size, size)
        print(
            f"export: {time.perf_counter() - start:.1f} s, {os.path.getsize(path) / 2**20:.1f} MiB"
        )
        print("ONNX Runtime vs PyTorch:", compare_onnx(path, wrapper))
        options = onnxruntime.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        image = np.random.default_rng(0).integers(0, 256, (1, 3, size, size)).astype(np.float32)
        runners = {
            "pytorch (config impls)": lambda: ProbabilityModel(native, size, size)(
                torch.from_numpy(image)
            ),
            "pytorch (export impls)": lambda: wrapper(torch.from_numpy(image)),
            "onnxruntime": lambda: session.run(["probs"], {"image": image}),
        }
        times = {name: [] for name in runners}
        with torch.no_grad():
            for round_index in range(args.repeats + 1):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    if round_index:  # round 0 is the warm-up
                        times[name].append(time.perf_counter() - start)
    print(f"Swin-T Mask2Former, {size}x{size}, CPU threads {torch.get_num_threads()}:")
    for name, values in times.items():
        print(f"  {name:24s} median {statistics.median(values) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
