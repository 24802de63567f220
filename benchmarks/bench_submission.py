"""Submission CSV writing: the competition baseline's string join vs ``SubmissionWriter``.

819 random 512x512 label maps of 11 classes (the size of the real test set) are resized to
256x256 and written as a submission CSV, (a) the way the baseline did it (``cv2.resize`` nearest,
then ``' '.join(str(e) for e in row)`` per image) and (b) with
:class:`mask2former.inference.submission.SubmissionWriter`. Prints the median seconds of each,
the speed-up (also for the formatting step alone), whether both files are byte-identical, and
the time of ``read_submission``.

    python benchmarks/bench_submission.py [--images 819] [--repeats 3]
"""

import argparse
import csv
import os
import statistics
import tempfile
import time

import cv2
import numpy as np

from mask2former.inference.submission import (
    HEADER,
    SubmissionWriter,
    format_prediction,
    read_submission,
    resize_nearest,
)


def write_naive(path, names, label_maps):
    """The baseline's way: per image, resize and join the labels' ``str``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER.split(","))
        for name, label_map in zip(names, label_maps):
            small = cv2.resize(label_map, (256, 256), interpolation=cv2.INTER_NEAREST)
            writer.writerow([name, " ".join(str(e) for e in small.flatten().tolist())])


def write_fast(path, names, label_maps):
    with SubmissionWriter(path, names) as writer:
        for name, label_map in zip(names, label_maps):
            writer.add(name, label_map)


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=819)
    parser.add_argument("--size", type=int, default=512, help="side of the random label maps")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    label_maps = rng.integers(
        0, args.classes, size=(args.images, args.size, args.size), dtype=np.uint8
    )
    names = [f"batch_{i // 100:02d}/{i:04d}.jpg" for i in range(args.images)]
    small = [resize_nearest(m, 256) for m in label_maps]
    join_only = median_seconds(
        lambda: [" ".join(str(e) for e in m.flatten().tolist()) for m in small], args.repeats
    )
    format_only = median_seconds(lambda: [format_prediction(m) for m in small], args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        naive_path = os.path.join(tmp, "naive.csv")
        fast_path = os.path.join(tmp, "fast.csv")
        naive = median_seconds(lambda: write_naive(naive_path, names, label_maps), args.repeats)
        fast = median_seconds(lambda: write_fast(fast_path, names, label_maps), args.repeats)
        read = median_seconds(lambda: read_submission(fast_path), args.repeats)
        with open(naive_path, "rb") as a, open(fast_path, "rb") as b:
            identical = a.read() == b.read()
        megabytes = os.path.getsize(fast_path) / 1e6

    print(
        f"{args.images} label maps {args.size}x{args.size}, {args.classes} classes -> 256x256 "
        f"CSV ({megabytes:.1f} MB), median of {args.repeats}"
    )
    print("formatting the 256x256 masks only (no resize, no file):")
    print(f"  str join           : {join_only:7.2f} s")
    print(f"  format_prediction  : {format_only:7.2f} s   ({join_only / format_only:.1f}x faster)")
    print("whole CSV (resize + format + write):")
    print(f"  baseline way       : {naive:7.2f} s")
    print(f"  SubmissionWriter   : {fast:7.2f} s   ({naive / fast:.1f}x faster)")
    print(f"  read_submission    : {read:7.2f} s")
    print(f"files byte-identical: {identical}")


if __name__ == "__main__":
    main()
