#!/usr/bin/env python
"""Run every benchmark of the project one after the other (``make bench``).

Each benchmark is a separate script printing its own table; run them on an otherwise idle
machine (timings of concurrent runs are meaningless on 2 cores).
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = [
    ("bench_rasterize.py", []),
    ("bench_submission.py", []),
    ("bench_pixel_decoder.py", []),
    ("bench_matcher.py", []),
    ("bench_mask_product.py", []),
    ("bench_mask2former.py", []),
    ("bench_neighborhood_attention.py", []),
    ("bench_semask.py", []),
    ("bench_crf.py", []),
    ("bench_data_loader.py", []),
    ("bench_precision.py", []),
    ("bench_pointwise_conv.py", []),
    ("bench_floor.py", []),
]


def main():
    failed = []
    for script, args in BENCHMARKS:
        print(f"\n######## {script} {' '.join(args)}", flush=True)
        start = time.time()
        if subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0:
            failed.append(script)
        print(f"######## {script}: {time.time() - start:.0f} s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
