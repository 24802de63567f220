#!/usr/bin/env python
"""Train-mapper throughput per core, copy-paste draw off and on.

    python benchmarks/bench_data_loader.py [--config-file configs/m2f_dinat_l.yaml]
        [--images 300] [--copy-paste-prob 0.3] [--bank-size 64] [--repeats 3]
        [--data auto|camvid|synthetic] [--profile] [KEY VALUE ...]

The mapper is the trainer's (``MaskFormerSemanticDatasetMapper.from_config``: multi-scale resize
of the short side in INPUT.MIN_SIZE_TRAIN, category-area crop INPUT.CROP, ColorAugSSD, flip,
padding, one mask per class), in one process with one torch / OpenCV thread.

Data: 512x512 JPEGs in a temporary folder, with COCO-polygon annotations, as training records
are. ``camvid``: the CamVid train photos (``../shared/data/camvid``) resized to 512x512, their
label maps traced into a COCO json (Unlabelled ignored); ``synthetic``: the synthetic trash
dataset at 512x512. ``auto``: CamVid when present.

Copy-paste: a bank of ``--bank-size`` images written by the trainer's bank hook
(:class:`CopyPasteBankHook` before training: uniform class weights, INPUT.COPY_PASTE settings),
drawn by :class:`CopyPasteSampler` with probability ``--copy-paste-prob``.

Each of ``--repeats`` rounds maps ``--images`` records (the same shuffled sequence, the same
random seed) with copy-paste off, then on; the table gives medians over the rounds of
images per CPU-second of this process (``time.process_time``: the per-core figure, robust to a
loaded machine) and of wall-clock images per second. ``--profile`` adds a cProfile of one
copy-paste-on round (functions by own time).
"""

import argparse
import cProfile
import io
import pstats
import random
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog

from dinat import add_dinat_config
from mask2former.data import register_coco_semseg, register_trash_dataset
from mask2former.data.augmentation import MaskFormerSemanticDatasetMapper
from mask2former.data.augmentation.copy_paste import CopyPasteSampler
from mask2former.data.offline.convert_labelmaps import labelmaps_to_coco
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import build_cfg
from mask2former.engine.hooks import bank_hook_from_cfg
from mask2former.loop.competition import CAMVID_CLASSES, CAMVID_UNLABELLED
from semask import add_semask_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "m2f_dinat_l.yaml"
CAMVID = REPO.parent / "shared" / "data" / "camvid" / "train"
SIZE = 512
DATASET = "bench_data_loader_train"


def prepare_camvid(folder, ignore_label, cfg):
    """CamVid train photos resized to SIZE x SIZE (JPEG quality 92, label maps nearest, Unlabelled
    -> ignore), traced into a COCO json and registered as ``DATASET``."""
    image_dir, label_dir = folder / "images", folder / "labels"
    image_dir.mkdir()
    label_dir.mkdir()
    for path in sorted((CAMVID / "images").glob("*.jpg")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        label = cv2.imread(str(CAMVID / "labels" / (path.stem + ".png")), cv2.IMREAD_UNCHANGED)
        if image is None or label is None:
            raise ValueError(f"{path}: unreadable CamVid image or label map")
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        label[label == CAMVID_UNLABELLED] = ignore_label
        cv2.imwrite(str(image_dir / path.name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(label_dir / (path.stem + ".png")), label)
    json_file = folder / "train.json"
    labelmaps_to_coco(
        str(label_dir), str(json_file), CAMVID_CLASSES, str(image_dir),
        ignore_label=ignore_label, background=None,
    )  # fmt: skip
    register_coco_semseg(
        DATASET, str(json_file), str(image_dir), cfg.DATASETS.VALIDATION,
        ignore_label=ignore_label, draw_order=cfg.DATASETS.POLYGON_DRAW_ORDER,
    )  # fmt: skip


def prepare_synthetic(folder, num_images, ignore_label, cfg):
    """The synthetic trash dataset at SIZE x SIZE, its train split registered as ``DATASET``."""
    generate_synthetic_trash(
        str(folder / "trash"), num_train=num_images, num_val=1, num_test=1, image_size=SIZE
    )
    prefix = DATASET[: -len("_train")]
    register_trash_dataset(
        str(folder / "trash"), prefix=prefix, cfg_validation=cfg.DATASETS.VALIDATION,
        draw_order=cfg.DATASETS.POLYGON_DRAW_ORDER, ignore_label=ignore_label,
    )  # fmt: skip


def build_bank(cfg, records):
    """The bank the trainer writes before training (its hook, built with the trainer's
    arguments); returns the bank folder."""
    hook = bank_hook_from_cfg(cfg, lambda: records)
    hook.before_train()
    return hook.bank_root


def map_records(mapper, records, seed):
    """Map ``records`` in order; returns (CPU seconds, wall seconds, bank images mapped)."""
    np.random.seed(seed)  # geometric augmentations and the mapper's generator
    random.seed(seed)  # ColorAugSSD
    from_bank = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for record in records:
        out = mapper(record)
        from_bank += str(out["image_id"]).startswith("copy_paste/")
    return time.process_time() - cpu, time.perf_counter() - wall, from_bank


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--images", type=int, default=300, help="records mapped per round")
    parser.add_argument("--copy-paste-prob", type=float, default=0.3)
    parser.add_argument("--bank-size", type=int, default=64, help="INPUT.COPY_PASTE.BANK_SIZE")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (off, on) timed")
    parser.add_argument("--data", choices=("auto", "camvid", "synthetic"), default="auto")
    parser.add_argument("--profile", action="store_true", help="cProfile one copy-paste round")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    data = args.data
    if data == "auto":
        data = "camvid" if CAMVID.is_dir() else "synthetic"
    with tempfile.TemporaryDirectory(prefix="bench_data_loader_") as tmp:
        tmp = Path(tmp)
        opts = [
            "DATASETS.TRAIN", f"('{DATASET}',)",
            "OUTPUT_DIR", str(tmp / "output"),
            "INPUT.COPY_PASTE.ENABLED", "True",
            "INPUT.COPY_PASTE.PROB", str(args.copy_paste_prob),
            "INPUT.COPY_PASTE.BANK_SIZE", str(args.bank_size),
        ] + list(args.opts)  # fmt: skip
        cfg = build_cfg(args.config_file, opts, (add_semask_config, add_dinat_config))
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if data == "camvid":
            prepare_camvid(tmp, ignore_label, cfg)
        else:
            prepare_synthetic(tmp, args.images, ignore_label, cfg)
        records = DatasetCatalog.get(DATASET)
        start = time.perf_counter()
        bank_root = build_bank(cfg, records)
        bank_s = time.perf_counter() - start

        order = np.random.default_rng(0).permutation(args.images) % len(records)
        sequence = [records[i] for i in order]
        variants = {
            "copy-paste off": MaskFormerSemanticDatasetMapper(cfg, True),
            f"copy-paste on (p={args.copy_paste_prob})": MaskFormerSemanticDatasetMapper(
                cfg, True, copy_paste=CopyPasteSampler(bank_root, args.copy_paste_prob)
            ),
        }
        for mapper in variants.values():  # warm-up: page cache, lazy imports
            map_records(mapper, sequence[:10], seed=1)
        results = {name: [] for name in variants}
        for round_index in range(args.repeats):
            for name, mapper in variants.items():
                results[name].append(map_records(mapper, sequence, seed=round_index))

        print(
            f"{args.config_file}: {len(records)} {data} records of {SIZE}x{SIZE}, "
            f"short side {min(cfg.INPUT.MIN_SIZE_TRAIN)}..{max(cfg.INPUT.MIN_SIZE_TRAIN)} "
            f"(max {cfg.INPUT.MAX_SIZE_TRAIN}), crop {tuple(cfg.INPUT.CROP.SIZE)} "
            f"(single category <= {cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA}), "
            f"colour jitter {cfg.INPUT.COLOR_AUG_SSD}; bank of {args.bank_size} images "
            f"({bank_s:.1f} s to build); {args.images} images x {args.repeats} rounds, "
            f"1 thread, medians"
        )
        print(
            f"{'variant':<26} {'images/CPU-s':>12} {'CPU ms/image':>12} "
            f"{'images/s (wall)':>15} {'bank draws':>10}"
        )
        for name, runs in results.items():
            cpu = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            drawn = statistics.median(r[2] for r in runs)
            print(
                f"{name:<26} {args.images / cpu:12.1f} {1000 * cpu / args.images:12.2f} "
                f"{args.images / wall:15.1f} {drawn / args.images:10.1%}"
            )
        if args.profile:
            profiler = cProfile.Profile()
            mapper = list(variants.values())[1]
            profiler.enable()
            map_records(mapper, sequence, seed=0)
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
            print(stream.getvalue())


if __name__ == "__main__":
    main()
