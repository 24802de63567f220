#!/usr/bin/env python
"""The whole competition loop on a label-map data root, one command (each tool a subprocess):

    python benchmarks/real_data_loop.py --data ../shared/data/camvid --output output/camvid_loop \
        [--budget-iters 1371] [--ablation-iters 400] [--steps convert models ...] [--jobs 2]

The data root holds train/ and val/, each with images/ and labels/ (label PNGs of class ids).
Classes: --class-names, or 0..N-1 with --num-classes (default: the CamVid names when the root is
called camvid, else numbered up to the largest label value found in the label maps). A rerun
reuses every complete step; --jobs N runs up to N independent steps side by side (each with
CPU cores // N threads); results.md / results.json go to --output (see
mask2former/loop/competition.py for the steps and rows).
"""

import argparse
import logging
import os
import shlex
import sys

from mask2former.loop import LoopSettings, run_loop
from mask2former.loop.competition import (
    CAMVID_CLASSES,
    CAMVID_UNLABELLED,
    STEP_GROUPS,
    numbered_classes,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="root with train/ and val/ (images/, labels/)")
    p.add_argument("--output", required=True, help="the loop's folder (reused on a rerun)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--class-names", nargs="+", help="name of each label value")
    names.add_argument("--num-classes", type=int, help="classes named 0..N-1")
    p.add_argument(
        "--ignore-label", type=int, help="label never trained or scored (CamVid 11, else 255)"
    )
    p.add_argument(
        "--background-label",
        type=int,
        help="label value that is a background class (default: none, uncovered pixels ignored)",
    )
    p.add_argument("--budget-iters", type=int, default=1371, help="iterations per main model")
    p.add_argument("--ablation-iters", type=int, default=400, help="iterations per ablation")
    p.add_argument("--steps", nargs="+", choices=STEP_GROUPS, default=list(STEP_GROUPS))
    p.add_argument("--config-a", default="configs/tiny/camvid_small_cpu.yaml")
    p.add_argument("--config-b", default="configs/tiny/camvid_semask_cpu.yaml")
    p.add_argument("--min-size-test", type=int, default=180, help="short side at test time")
    p.add_argument("--crop", type=int, default=160, help="training crop side")
    p.add_argument("--workers", type=int, default=2, help="tools/ensemble.py worker processes")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="steps run side by side (independent ones, e.g. the trainings of A and B), each "
        "with CPU cores // jobs threads",
    )
    p.add_argument("--no-tta", action="store_true", help="skip the TTA rows (vote plain dumps)")
    p.add_argument(
        "--crf-presets", nargs="+", help="CRF presets of the CRF rows (default: every preset)"
    )
    p.add_argument(
        "--final-ensemble-only",
        action="store_true",
        help="only the vote + CRF + agreement row (no plain vote, per-preset and mode rows)",
    )
    p.add_argument(
        "--ignore-in-mask-loss",
        nargs="+",
        choices=("on", "off"),
        default=["on", "off"],
        help="IGNORE_IN_MASK_LOSS of the models retrained on pseudo-labels",
    )
    p.add_argument(
        "--pseudo-threshold",
        type=float,
        default=0.9,
        help="minimum soft-vote probability of a pseudo-labelled pixel",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of every model")
    args = p.parse_args(argv)
    default_ignore = 255
    if args.class_names is None:
        if args.num_classes:
            args.class_names = [str(i) for i in range(args.num_classes)]
        elif os.path.basename(os.path.normpath(args.data)).lower() == "camvid":
            args.class_names = list(CAMVID_CLASSES)
            default_ignore = CAMVID_UNLABELLED
    if args.ignore_label is None:
        args.ignore_label = default_ignore
    if args.class_names is None:  # numbered up to the largest label value of the label maps
        args.class_names = numbered_classes(args.data, args.ignore_label)
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = LoopSettings(
        data_root=args.data,
        output=args.output,
        class_names=args.class_names,
        ignore_label=args.ignore_label,
        background_label=args.background_label,
        config_a=args.config_a,
        config_b=args.config_b,
        budget_iters=args.budget_iters,
        ablation_iters=args.ablation_iters,
        min_size_test=args.min_size_test,
        crop=args.crop,
        steps=args.steps,
        extra_opts=args.opts,
        ensemble_workers=args.workers,
        tta=not args.no_tta,
        pseudo_threshold=args.pseudo_threshold,
        crf_presets=args.crf_presets,
        all_ensemble_rows=not args.final_ensemble_only,
        pseudo_ignore_in_mask=[flag == "on" for flag in args.ignore_in_mask_loss],
        jobs=args.jobs,
    )
    command = shlex.join(["python", "benchmarks/real_data_loop.py", *sys.argv[1:]])
    run_loop(settings, command=command)


if __name__ == "__main__":
    main()
