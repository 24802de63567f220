"""Pseudo-label unlabeled images from probability dumps.

    python tools/predict.py --config-file ... --weights ... --dataset trash_test \
        --probs out/probs_a ...
    m2f-pseudo-label --dumps out/probs_a out/probs_b [--weights 2 1] \
        --json data/trash/test.json --image-root data/trash --output out/pseudo_test \
        --threshold 0.9 [--class-thresholds 9=0.7 5=0.8] [--min-component 16] [--mode-filter] \
        [--name trash_test_pseudo]
    m2f-pseudo-label --dumps out/probs_a --dataset camvid_val --config-file C \
        --output out/pseudo_val [KEY VALUE ...]

The images come from ``--json`` + ``--image-root`` or from a registered ``--dataset`` of any kind
(trash, COCO, label-map, pseudo-label split; registered from ``--config-file`` + overrides).

Several dumps are soft-voted image by image (mask2former.inference.pseudo_label_writer). Writes
OUT/pseudo.json (the json's images + sem_seg_file_name, polygons of the confident regions),
OUT/labels/<file_name>.png (ignore 255) and OUT/report.json, then prints the statistics and the
config overrides that train on train + pseudo-labels.
"""

import logging
import os
import sys

from detectron2.data import MetadataCatalog

from mask2former.cli.command import (
    add_config_file_argument,
    add_overrides_argument,
    console_entry,
    project_cfg,
    tool_parser,
)
from mask2former.data import register_datasets_from_cfg
from mask2former.data.catalog.coco import resolve_uncovered
from mask2former.data.catalog.common import dataset_images_source
from mask2former.data.coco import read_coco_json
from mask2former.inference.pseudo_label_writer import (
    PSEUDO_JSON_NAME,
    format_report,
    pseudo_label_dumps,
)


def parse_class_thresholds(items):
    """["9=0.7", ...] -> {9: 0.7, ...}."""
    thresholds = {}
    for item in items:
        label, sep, value = item.partition("=")
        try:
            thresholds[int(label)] = float(value)
        except ValueError:
            raise SystemExit(
                f"--class-thresholds: expected LABEL=THRESHOLD (e.g. 9=0.7), got {item!r}"
            ) from None
        if not sep:
            raise SystemExit(
                f"--class-thresholds: expected LABEL=THRESHOLD (e.g. 9=0.7), got {item!r}"
            )
    return thresholds


def parse_args(argv=None):
    p = tool_parser(__doc__)
    p.add_argument(
        "--dumps",
        nargs="+",
        required=True,
        help="probability dump folder(s) (tools/predict.py --probs)",
    )
    p.add_argument("--weights", nargs="+", type=float, help="one weight per dump (soft voting)")
    p.add_argument("--json", help="COCO json of the unlabeled images (e.g. test.json)")
    p.add_argument("--image-root", help="folder the json's file_name are relative to")
    p.add_argument("--dataset", help="a registered dataset instead of --json / --image-root")
    add_config_file_argument(p, required=False, help="config whose DATASETS.* register --dataset")
    p.add_argument(
        "--output", required=True, help="folder of the pseudo-labeled split (must not exist)"
    )
    p.add_argument(
        "--threshold", type=float, default=0.9, help="minimum max-probability of a labelled pixel"
    )
    p.add_argument(
        "--class-thresholds",
        nargs="+",
        default=[],
        metavar="LABEL=THR",
        help="per-class thresholds overriding --threshold for pixels predicted as LABEL",
    )
    p.add_argument(
        "--min-component",
        type=int,
        default=0,
        help="confident 8-connected components with fewer pixels become ignored",
    )
    p.add_argument(
        "--mode-filter", action="store_true", help="3x3 mode filter of the confident labels"
    )
    p.add_argument("--ignore-label", type=int, default=255)
    p.add_argument(
        "--name",
        help="dataset name in the printed config (default: <json stem or dataset>_pseudo)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --output once the new split is complete"
    )
    add_overrides_argument(p, "config overrides KEY VALUE ... (with --dataset)")
    args = p.parse_args(argv)
    if args.dataset:
        if args.json or args.image_root:
            p.error("give --dataset or --json / --image-root, not both")
    elif not (args.json and args.image_root):
        p.error("give --json and --image-root, or --dataset")
    elif args.opts or args.config_file:
        p.error("--config-file and KEY VALUE overrides are only used with --dataset")
    output = os.path.realpath(args.output)
    for dump in args.dumps:
        if os.path.commonpath([output, os.path.realpath(dump)]) == output:
            p.error(f"the output folder {args.output} contains the dump {dump}")
    return args


def image_source(args):
    """(source json or name, its COCO dict without a json, image root, uncovered, default
    split name) from --json / --dataset."""
    if not args.dataset:
        stem = os.path.splitext(os.path.basename(args.json))[0]
        # the json's info.uncovered (label-map converter) says whether label 0 is Background
        uncovered = resolve_uncovered(None, read_coco_json(args.json), args.json)
        return args.json, None, args.image_root, uncovered, stem + "_pseudo"
    cfg = project_cfg(args)
    register_datasets_from_cfg(cfg)
    json_file, data, uncovered = dataset_images_source(args.dataset)
    image_root = MetadataCatalog.get(args.dataset).image_root
    source = json_file or f"dataset {args.dataset!r}"
    return source, data, image_root, uncovered, args.dataset + "_pseudo"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    source, data, image_root, uncovered, default_name = image_source(args)
    report = pseudo_label_dumps(
        args.dumps,
        args.output,
        source,
        weights=args.weights,
        threshold=args.threshold,
        class_thresholds=parse_class_thresholds(args.class_thresholds),
        min_component=args.min_component,
        apply_mode_filter=args.mode_filter,
        ignore_label=args.ignore_label,
        image_root=image_root,
        overwrite=args.overwrite,
        source_data=data,
        uncovered=uncovered,
    )
    name = args.name or default_name
    json_path = os.path.join(os.path.abspath(args.output), PSEUDO_JSON_NAME)
    print(format_report(report, name, json_path, os.path.abspath(image_root)))
    return report


console_main = console_entry(main)


if __name__ == "__main__":
    sys.exit(console_main())
