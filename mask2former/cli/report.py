"""Write a self-contained HTML report of a dataset and, with --weights, of a model on it.

    m2f-report --config-file configs/m2f_dinat_l.yaml --dataset trash_val \
        --output out/report.html [--weights out/model_final.pth] [--worst 8] [--tta] \
        [KEY VALUE ...]

The page (one file, images embedded, no scripts) shows the class distribution, objects per
image and object sizes; with weights also the LB-style per-class IoU, the confusion matrix and
the worst images by per-image mIoU. Datasets are registered from the config.
"""

import sys

from detectron2.utils.logger import setup_logger

from mask2former.cli.command import (
    add_config_file_argument,
    add_overrides_argument,
    console_entry,
    project_cfg,
    tool_parser,
)
from mask2former.report import build_report


def parse_args(argv=None):
    p = tool_parser(__doc__)
    add_config_file_argument(p)
    p.add_argument("--weights", help="model checkpoint (.pth / .pkl); without it, dataset only")
    p.add_argument("--dataset", required=True, help="registered dataset name, e.g. trash_val")
    p.add_argument("--output", required=True, help="the HTML file to write")
    p.add_argument("--worst", type=int, default=8, help="how many worst images to show")
    p.add_argument(
        "--tta", action="store_true", help="multi-scale + flip (TEST.AUG.MIN_SIZES / FLIP)"
    )
    add_overrides_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask2former")
    cfg = project_cfg(args)
    return build_report(
        cfg, args.dataset, args.output, weights=args.weights, tta=args.tta, worst_k=args.worst
    )


console_main = console_entry(main, log_info=True)


if __name__ == "__main__":
    sys.exit(console_main())
