r"""Soft-voting ensemble of probability dumps -> optional DenseCRF -> agreement overwrite ->
outputs (submission CSV, label PNGs, probability dump, score).

    m2f-ensemble --dumps out/probs_dinat out/probs_semask out/probs_swin \
        --weights 2 2 1 --json data/trash/test.json --crf default --agreement-overwrite \
        --submission out/ensemble.csv [--labels out/ens_labels] [--probs out/probs_ens] \
        [--workers 2]
    m2f-ensemble --dumps ... --json data/trash/val.json --score --score-dir out/ens_val
    m2f-ensemble --dumps ... --dataset trash_val --score DATASETS.TRASH_ROOT data/trash

The dumps come from ``tools/predict.py --probs`` (keys = the json ``file_name`` s). Images (for
DenseCRF) are read from ``--image-root`` (default: the json's folder, or the dataset's image
root). Config overrides ``KEY VALUE`` (with ``--dataset``) go last.
"""

import json
import os
import sys

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from mask2former.cli.command import (
    add_config_file_argument,
    add_overrides_argument,
    console_entry,
    project_cfg,
    tool_parser,
)
from mask2former.data import register_coco_semseg, register_datasets_from_cfg
from mask2former.data.catalog.common import dataset_file_names
from mask2former.data.coco import coco_image_names
from mask2former.inference.ensemble import SoftVotingEnsemble
from mask2former.inference.pipeline import EnsemblePipeline
from mask2former.inference.sinks import (
    LabelPngSink,
    ProbDumpSink,
    ScoreSink,
    SubmissionSink,
    write_predictions,
)
from mask2former.postprocess.crf import CRF_PRESETS, DEFAULT_ITERATIONS


def parse_args(argv=None):
    p = tool_parser(__doc__)
    p.add_argument("--dumps", nargs="+", required=True, help="probability dump folders")
    p.add_argument(
        "--weights", nargs="+", type=float, help="one weight per dump (normalised; default equal)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--json", help="COCO json of the images: submission row order, ground truth of --score"
    )
    src.add_argument(
        "--dataset",
        help="a registered dataset (trash, COCO, label-map or pseudo-label) instead of --json "
        "(see --config-file)",
    )
    add_config_file_argument(p, required=False, help="config whose DATASETS.* register --dataset")
    p.add_argument(
        "--image-root", help="images folder (default: the json's folder / the dataset's root)"
    )
    p.add_argument(
        "--crf", choices=sorted(CRF_PRESETS), help="DenseCRF of the soft vote with this preset"
    )
    p.add_argument(
        "--crf-gaussian",
        nargs=2,
        type=float,
        metavar=("SXY", "COMPAT"),
        help="change the preset's Gaussian kernel",
    )
    p.add_argument(
        "--crf-bilateral",
        nargs=3,
        type=float,
        metavar=("SXY", "SRGB", "COMPAT"),
        help="change the preset's bilateral kernel",
    )
    p.add_argument(
        "--crf-iters",
        type=int,
        default=DEFAULT_ITERATIONS,
        help="mean-field iterations (default %(default)s)",
    )
    p.add_argument(
        "--agreement-overwrite",
        action="store_true",
        help="pixels where the models' argmaxes agree take that label (after the CRF)",
    )
    p.add_argument("--min-agree", type=int, help="models that must agree (default: all)")
    p.add_argument(
        "--mode-filter", action="store_true", help="3x3 mode filter of the labels (last step)"
    )
    p.add_argument("--submission", help="write the submission CSV here (rows in the json's order)")
    p.add_argument("--labels", help="write label PNGs here (<folder>/<file_name>.png)")
    p.add_argument(
        "--probs",
        help="write the soft vote (the CRF marginals with --crf) as a new dump; "
        "--agreement-overwrite / --mode-filter change only the labels",
    )
    p.add_argument("--score", action="store_true", help="LB-style score of the final labels")
    p.add_argument(
        "--score-dir", help="where --score writes lb_metrics.json / confusion_matrix.png"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (one image per process)"
    )
    add_overrides_argument(p, "config overrides KEY VALUE ... (with --dataset)")
    args = p.parse_args(argv)

    if (args.crf_gaussian or args.crf_bilateral) and not args.crf:
        p.error("--crf-gaussian / --crf-bilateral change a preset: give --crf too")
    if args.min_agree is not None and not args.agreement_overwrite:
        p.error("--min-agree needs --agreement-overwrite")
    if args.crf_iters < 0 or args.workers < 1:
        p.error("--crf-iters must be >= 0 and --workers >= 1")
    if (args.opts or args.config_file) and not args.dataset:
        p.error("--config-file and KEY VALUE overrides are only used with --dataset")
    needs_json = [
        flag
        for flag, on in (
            ("--submission", args.submission),
            ("--crf", args.crf),
            ("--score", args.score),
        )
        if on
    ]
    if needs_json and not (args.json or args.dataset):
        p.error(f"{', '.join(needs_json)}: give --json or --dataset")
    if args.score_dir and not args.score:
        p.error("--score-dir needs --score")
    if not (args.submission or args.labels or args.probs or args.score):
        p.error("nothing to do: give --submission, --labels, --probs and/or --score")
    dumps = {os.path.realpath(d) for d in args.dumps}
    for name in ("probs", "labels"):
        folder = getattr(args, name)
        if folder and os.path.realpath(folder) in dumps:
            p.error(f"--{name} {folder} is one of the input dumps")
    return args


def crf_params(args):
    if not args.crf:
        return None
    params = CRF_PRESETS[args.crf]
    if args.crf_gaussian:
        params = params.replace(
            gaussian_sxy=args.crf_gaussian[0], gaussian_compat=args.crf_gaussian[1]
        )
    if args.crf_bilateral:
        sxy, srgb, compat = args.crf_bilateral
        params = params.replace(bilateral_sxy=sxy, bilateral_srgb=srgb, bilateral_compat=compat)
    return params


def image_source(args):
    """(image keys in order or None, where they come from, image_root, dataset name for
    scoring) from --json / --dataset (any dataset kind the config registers)."""
    if args.dataset:
        register_datasets_from_cfg(project_cfg(args))
        image_root = args.image_root or MetadataCatalog.get(args.dataset).image_root
        names = list(dataset_file_names(args.dataset).values())
        return names, f"dataset {args.dataset!r}", image_root, args.dataset
    if args.json:
        image_root = args.image_root or os.path.dirname(os.path.abspath(args.json))
        dataset = None
        if args.score:
            dataset = f"ensemble:{os.path.abspath(args.json)}"
            register_coco_semseg(dataset, args.json, image_root)
        return list(coco_image_names(args.json).values()), args.json, image_root, dataset
    return None, None, args.image_root, None


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask2former")
    logger = setup_logger(name="ensemble")
    ensemble = SoftVotingEnsemble(args.dumps, args.weights)
    names, source, image_root, dataset = image_source(args)
    file_names = ensemble.file_names
    if names is not None:
        file_names = ensemble.check_file_names(names, source)
    pipeline = EnsemblePipeline(
        ensemble,
        crf_params=crf_params(args),
        crf_iterations=args.crf_iters,
        agreement=args.agreement_overwrite,
        min_agree=args.min_agree,
        apply_mode_filter=args.mode_filter,
        image_root=image_root,
        keep_probs=bool(args.probs),
    )
    logger.info(
        "%s; %d images; CRF %s; agreement overwrite %s; mode filter %s",
        ensemble.description(),
        len(file_names),
        pipeline.crf_params,
        args.agreement_overwrite,
        args.mode_filter,
    )

    sinks = {}  # the score first: its class check fails before any other output is started
    if args.score:
        sinks["score"] = ScoreSink(dataset, args.score_dir, class_names=ensemble.class_names)
    if args.submission:
        sinks["submission"] = SubmissionSink(args.submission, file_names)
    if args.probs:
        sinks["probs"] = ProbDumpSink(args.probs, ensemble.class_names, ensemble.description())
    if args.labels:
        sinks["labels"] = LabelPngSink(args.labels)
    predictions = pipeline.predictions(file_names, workers=args.workers)
    results = write_predictions(tqdm(predictions, total=len(file_names), desc="ensemble"), sinks)
    score = results.get("score")

    if args.submission:
        logger.info("submission written to %s", args.submission)
    if args.probs:
        logger.info("probabilities written to %s", args.probs)
    if args.labels:
        logger.info("%d label PNGs in %s", results["labels"], args.labels)
    if score is not None:
        logger.info("LB-style score: %s", json.dumps({k: round(v, 4) for k, v in score.items()}))
    return score


console_main = console_entry(main, log_info=True)


if __name__ == "__main__":
    sys.exit(console_main())
