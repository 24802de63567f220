"""Predict a registered dataset: submission CSV, probability dump, overlay pictures, LB score.

    m2f-predict --config-file configs/m2f_dinat_l.yaml --weights out/model_final.pth \
        --dataset trash_test --submission out/submission.csv --probs out/probs_dinat [--tta] \
        [--overlays out/overlays --num-overlays 16] [--score] [KEY VALUE ...]

    m2f-predict --config-file C --weights W --input photos/ [more.jpg 'dir/*.png'] \
        --submission out/sub.csv --probs out/probs --labels out/labels --overlays out/overlays \
        [--batch-size 4 --workers 2] [--] [KEY VALUE ...]

Datasets are registered from the config (DATASETS.TRASH_ROOT, COCO_SEMSEG, LABELMAP_SEMSEG).
"""

import json
import sys

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from mask2former.cli.command import (
    add_config_file_argument,
    add_overrides_argument,
    console_entry,
    project_cfg,
    tool_parser,
)
from mask2former.data import register_datasets_from_cfg
from mask2former.data.catalog.common import dataset_file_names
from mask2former.engine import SafeCheckpointer, setup_cpu_runtime
from mask2former.inference.image_inputs import predict_image_files
from mask2former.inference.predictor import SemSegPredictor, predict_records
from mask2former.inference.sinks import OverlaySink, ProbDumpSink, ScoreSink, SubmissionSink


def parse_args(argv=None):
    p = tool_parser(__doc__)
    add_config_file_argument(p)
    p.add_argument("--weights", required=True, help="model checkpoint (.pth / .pkl)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="registered dataset name, e.g. trash_test")
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="image files, glob patterns or folders instead of a dataset (no ground truth; "
        "classes of DATASETS.TEST[0]); KEY VALUE overrides go before --input or after --",
    )
    p.add_argument("--submission", help="write the submission CSV here")
    p.add_argument("--probs", help="write a float16 probability dump to this folder")
    p.add_argument("--overlays", help="write image | GT | prediction pictures to this folder")
    p.add_argument("--num-overlays", type=int, default=8)
    p.add_argument("--score", action="store_true", help="LB-style score against the ground truth")
    p.add_argument(
        "--score-dir", help="where the score writes lb_metrics.json / confusion_matrix.png"
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="multi-scale + flip (TEST.AUG.MIN_SIZES / MAX_SIZE / FLIP); also on when the config "
        "sets TEST.AUG.ENABLED",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    p.add_argument("--labels", help="with --input: write label PNGs to this folder")
    p.add_argument(
        "--batch-size", type=int, default=1, help="with --input: images per forward pass"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="with --input: image-decoding worker processes"
    )
    add_overrides_argument(p)
    args = p.parse_args(argv)
    if args.opts[:1] == ["--"]:  # the separator after --input's paths
        args.opts = args.opts[1:]
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask2former")
    logger = setup_logger(name="predict")
    cfg = project_cfg(args)
    setup_cpu_runtime(cfg)
    register_datasets_from_cfg(cfg)
    tta = args.tta or cfg.TEST.AUG.ENABLED  # the official meaning of TEST.AUG.ENABLED
    model = build_model(cfg)
    # refuses unsafe or broken files and weights that leave any model tensor unloaded
    SafeCheckpointer(
        model, allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION
    ).load_for_inference(args.weights)
    if args.input:
        if args.score:
            raise SystemExit("--score needs --dataset (images given by --input have no labels)")
        return predict_image_files(
            cfg,
            model,
            args.input,
            submission=args.submission,
            probs=args.probs,
            labels=args.labels,
            overlays=args.overlays,
            num_overlays=args.num_overlays,
            tta=tta,
            batch_size=args.batch_size,
            workers=args.workers,
            limit=args.limit,
            model_name=args.weights,
        )
    if args.labels or args.batch_size != 1 or args.workers:
        raise SystemExit("--labels, --batch-size and --workers need --input")
    predictor = SemSegPredictor(cfg, model, tta=tta)
    records = DatasetCatalog.get(args.dataset)
    if args.limit > 0:
        records = records[: args.limit]

    if not (args.submission or args.probs or args.overlays or args.score):
        raise SystemExit("nothing to do: give --submission, --probs, --overlays and/or --score")
    if args.submission and args.limit > 0:
        raise SystemExit(
            "--limit cannot be combined with --submission (every test image is needed)"
        )
    file_names = dataset_file_names(args.dataset)
    sinks = {}
    if args.submission:
        sinks["submission"] = SubmissionSink(args.submission, file_names.values())
    if args.probs:
        classes = MetadataCatalog.get(args.dataset).stuff_classes
        sinks["probs"] = ProbDumpSink(args.probs, classes, model_name=args.weights)
    if args.overlays:
        sinks["overlays"] = OverlaySink(args.overlays, args.dataset, args.num_overlays)
    if args.score:
        sinks["score"] = ScoreSink(args.dataset, args.score_dir)

    closed = predict_records(
        predictor,
        records,
        file_names,
        list(sinks.values()),
        cfg.INPUT.FORMAT,
        description=f"predict {args.dataset}",
    )
    results = dict(zip(sinks, closed))
    if args.submission:
        logger.info("submission written to %s", results["submission"])
    if args.probs:
        logger.info("probabilities written to %s", args.probs)
    if args.overlays:
        logger.info("%d overlay pictures in %s", len(results["overlays"]), args.overlays)
    if args.score:
        logger.info(
            "LB-style score: %s", json.dumps({k: round(v, 4) for k, v in results["score"].items()})
        )
    return results


console_main = console_entry(main, log_info=True)


if __name__ == "__main__":
    sys.exit(console_main())
