"""Export a trained semantic model (Mask2Former Swin, SeMask, DiNAT) to ONNX at a fixed size.

    m2f-export-onnx --config-file configs/m2f_swin_t.yaml --weights out/model.pth \
        --output out/model.onnx --height 512 --width 512 [KEY VALUE ...]

Input ``image``: float32 [1, 3, H, W] in INPUT.FORMAT channel order, values 0..255 (normalised
inside the graph). Output ``probs``: float32 [1, K, H, W] calibrated per-pixel probabilities.
The written file is checked and compared with PyTorch on a random image.
"""

import argparse
import json
import sys

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from dinat import add_dinat_config
from mask2former.engine import SafeCheckpointer, build_cfg
from mask2former.export import compare_onnx, export_config, export_onnx
from semask import add_semask_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model checkpoint (.pth / .pkl)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--height", type=int, required=True, help="fixed input height (pixels)")
    p.add_argument("--width", type=int, required=True, help="fixed input width (pixels)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask2former")
    logger = setup_logger(name="export_onnx")
    cfg = build_cfg(args.config_file, args.opts, (add_semask_config, add_dinat_config))
    cfg = export_config(cfg)
    model = build_model(cfg).cpu()
    SafeCheckpointer(
        model, allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION
    ).load_for_inference(args.weights)
    wrapper = export_onnx(model, args.output, args.height, args.width, args.opset)
    report = compare_onnx(args.output, wrapper)
    logger.info("wrote %s; ONNX Runtime vs PyTorch: %s", args.output, json.dumps(report))
    return report


def console_main(argv=None) -> int:
    """The ``m2f-export-onnx`` command: :func:`main` on the command line (errors raise), exit
    status 0."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
