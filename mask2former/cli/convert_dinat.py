"""Convert an official DiNAT ImageNet checkpoint into Detectron2 backbone weights.

Usage (after `pip install -e .`, from any directory; or `python tools/convert_dinat_to_d2.py`):

    m2f-convert-dinat dinat_large_in22k_224_11x11interp.pth dinat_l_d2.pth

then train with ``MODEL.WEIGHTS dinat_l_d2.pth``. See ``dinat/convert.py`` for what is converted.
"""

import argparse
import sys

from dinat.convert import convert_dinat_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official DiNAT checkpoint (.pth)")
    parser.add_argument("dst", help="output Detectron2 checkpoint (.pth)")
    parser.add_argument(
        "--kernel-size",
        type=int,
        help="kernel size of the target model: rpb tables of another size are resized (bicubic)",
    )
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="allow arbitrary pickled objects in SRC (only for files you trust)",
    )
    args = parser.parse_args(argv)
    try:
        count, dropped = convert_dinat_checkpoint(
            args.src, args.dst, trusted=args.trusted, kernel_size=args.kernel_size
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dropped_names = ", ".join(dropped) or "nothing"
    print(f"wrote {count} backbone tensors to {args.dst} (dropped: {dropped_names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
