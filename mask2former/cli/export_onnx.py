"""Export a trained semantic model (Mask2Former Swin, SeMask, DiNAT) to ONNX at a fixed size.

    m2f-export-onnx --config-file configs/m2f_swin_t.yaml --weights out/model.pth \
        --output out/model.onnx --height 512 --width 512 [KEY VALUE ...]

Input ``image``: float32 [1, 3, H, W] in INPUT.FORMAT channel order, values 0..255 (normalised
inside the graph). Output ``probs``: float32 [1, K, H, W] calibrated per-pixel probabilities.
The written file is checked and compared with PyTorch on a random image.
"""

import json
import sys

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from mask2former.cli.command import (
    add_config_file_argument,
    add_overrides_argument,
    console_entry,
    project_cfg,
    tool_parser,
)
from mask2former.engine import SafeCheckpointer
from mask2former.export import compare_onnx, export_config, export_onnx


def parse_args(argv=None):
    p = tool_parser(__doc__)
    add_config_file_argument(p)
    p.add_argument("--weights", required=True, help="model checkpoint (.pth / .pkl)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--height", type=int, required=True, help="fixed input height (pixels)")
    p.add_argument("--width", type=int, required=True, help="fixed input width (pixels)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    add_overrides_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="mask2former")
    logger = setup_logger(name="export_onnx")
    cfg = project_cfg(args)
    cfg = export_config(cfg)
    model = build_model(cfg).cpu()
    SafeCheckpointer(
        model, allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION
    ).load_for_inference(args.weights)
    wrapper = export_onnx(model, args.output, args.height, args.width, args.opset)
    report = compare_onnx(args.output, wrapper)
    logger.info("wrote %s; ONNX Runtime vs PyTorch: %s", args.output, json.dumps(report))
    return report


console_main = console_entry(main)


if __name__ == "__main__":
    sys.exit(console_main())
