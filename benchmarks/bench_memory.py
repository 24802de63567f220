#!/usr/bin/env python
"""Peak RSS of tools/predict.py --probs and tools/ensemble.py --crf default --workers 2 on 50 vs
500 synthetic 512x512 images (random-weight tiny model), each tool run as a subprocess:

    python benchmarks/bench_memory.py [--counts 50 500] [--size 512] [--output output/bench_memory]

Two figures per run: the largest single process (``os.wait4``'s rusage: the child and every
descendant it waited for, max over processes) and the largest sum of RSS over the tool's process
tree (``/proc`` sampled every 0.05 s; the ensemble's worker processes run at the same time as
the main one). The larger count must stay within 1.2x of the smaller one.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from detectron2.modeling import build_model
from PIL import Image

from dinat import add_dinat_config
from mask2former.engine import build_cfg
from mask2former.utils.io import write_json
from semask import add_semask_config

CONFIG = "configs/tiny/m2f_swin_tiny_cpu.yaml"
NUM_CLASSES = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(root, count, size, seed=0):
    """``count`` noisy RGB images with one square object each, and their COCO json."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        name = f"{i:04d}.jpg"
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        x, y, side = (float(v) for v in rng.integers(0, size // 2, 3) + [0, 0, 16])
        polygon = [x, y, x + side, y, x + side, y + side, x, y + side]
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1 + i % (NUM_CLASSES - 1),
                "segmentation": [polygon],
                "area": side * side,
                "bbox": [x, y, side, side],
                "iscrowd": 0,
            }
        )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES)]
    json_file = os.path.join(root, "images", "data.json")
    write_json(json_file, {"images": images, "annotations": annotations, "categories": categories})
    return json_file


def dataset_opts(name, json_file, size):
    images = os.path.dirname(json_file)
    return [
        "DATASETS.TRASH_ROOT", "",
        "DATASETS.COCO_SEMSEG", repr([[name, json_file, images]]),
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(NUM_CLASSES),
        "INPUT.MIN_SIZE_TEST", str(size),
        "INPUT.MAX_SIZE_TEST", str(size),
    ]  # fmt: skip


def random_weights(path, size):
    cfg = build_cfg(
        CONFIG, dataset_opts("unused", "unused.json", size), (add_semask_config, add_dinat_config)
    )
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)


def _tree_rss(pid):
    """Sum of VmRSS (bytes) of ``pid`` and its descendants (from /proc)."""
    children = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def measure(command, log_path):
    """(max single-process RSS, max process-tree RSS) in MiB, and the wall time, of one run."""
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
        peak_tree = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak_tree[0] = max(peak_tree[0], _tree_rss(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-20:])
        raise SystemExit(f"{command[1]} failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    return usage.ru_maxrss / 1024, peak_tree[0] / 2**20, wall


def run(counts, size, output, workers=2):
    os.makedirs(output, exist_ok=True)
    weights = os.path.join(output, "random_weights.pth")
    random_weights(weights, size)
    results = []
    for count in counts:
        root = os.path.join(output, f"data_{count}")
        json_file = write_images(root, count, size)
        name = f"bench_memory_{count}"
        opts = dataset_opts(name, json_file, size)
        dump = os.path.join(output, f"probs_{count}")
        predict = [
            sys.executable, "tools/predict.py", "--config-file", CONFIG, "--weights", weights,
            "--dataset", name, "--probs", dump, *opts,
        ]  # fmt: skip
        ensemble = [
            sys.executable, "tools/ensemble.py", "--dumps", dump, dump, "--dataset", name,
            "--config-file", CONFIG, "--crf", "default", "--workers", str(workers),
            "--labels", os.path.join(output, f"labels_{count}"), *opts,
        ]  # fmt: skip
        for tool, command in (("predict --probs", predict), ("ensemble --crf", ensemble)):
            log = os.path.join(output, f"{tool.split()[0]}_{count}.log")
            single, tree, wall = measure(command, log)
            results.append(
                {"tool": tool, "images": count, "max_process_mib": round(single, 1),
                 "process_tree_mib": round(tree, 1), "wall_s": round(wall, 1)}
            )  # fmt: skip
            print(
                f"{tool:16s} {count:5d} images: max process {single:7.1f} MiB, "
                f"process tree {tree:7.1f} MiB, {wall:6.1f} s",
                flush=True,
            )
    ratios = {}
    for tool in ("predict --probs", "ensemble --crf"):
        rows = [r for r in results if r["tool"] == tool]
        small, large = rows[0], rows[-1]
        ratios[tool] = {
            key: round(large[key] / small[key], 3)
            for key in ("max_process_mib", "process_tree_mib")
        }
        print(f"{tool}: {large['images']} vs {small['images']} images: {ratios[tool]}")
    document = {"size": size, "counts": list(counts), "results": results, "ratios": ratios}
    write_json(os.path.join(output, "bench_memory.json"), document, indent=1)
    return document


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--counts", nargs=2, type=int, default=[50, 500], help="small, large count")
    p.add_argument("--size", type=int, default=512, help="image side")
    p.add_argument("--workers", type=int, default=2, help="tools/ensemble.py workers")
    p.add_argument("--output", default="output/bench_memory")
    p.add_argument("--limit", type=float, default=1.2, help="allowed ratio large / small")
    args = p.parse_args(argv)
    document = run(args.counts, args.size, args.output, args.workers)
    worst = max(v for r in document["ratios"].values() for v in r.values())
    print(json.dumps(document["ratios"]))
    if worst > args.limit:
        raise SystemExit(
            f"peak RSS grows {worst:.2f}x from {args.counts[0]} to {args.counts[1]} images "
            f"(limit {args.limit}x)"
        )


if __name__ == "__main__":
    main()
