"""Convert an official Swin Transformer ImageNet checkpoint to a Detectron2 checkpoint.

    m2f-convert-swin swin_tiny_patch4_window7_224.pth swin_tiny_d2.pth
    m2f-convert-swin swin_base_patch4_window12_384_22k.pth out.pth --window-size 7

The output holds ``{"model": {"backbone.<name>": tensor}}`` for ``MODEL.WEIGHTS`` of a model
whose backbone is ``D2SwinTransformer``; the classifier head, final norm and attention-mask
buffers are dropped, and the relative position bias tables are resized (bicubic) if
``--window-size`` differs from the checkpoint's.
"""

import argparse
import sys

from mask2former.modeling.backbone.swin_convert import convert_swin_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="official Swin checkpoint (.pth with a 'model' state dict)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--window-size", type=int, help="window size of the target model")
    parser.add_argument("--prefix", default="backbone.", help="prefix of the converted names")
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="allow arbitrary pickled objects in INPUT (only for files you trust)",
    )
    args = parser.parse_args(argv)
    try:
        weights = convert_swin_checkpoint(
            args.input, args.output, args.window_size, args.prefix, trusted=args.trusted
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(weights)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
