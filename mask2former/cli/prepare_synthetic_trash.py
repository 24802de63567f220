"""Write a deterministic synthetic trash dataset in the competition format.

m2f-synthetic --output data/trash --image-size 128
"""

import sys

from mask2former.cli.command import console_entry, tool_parser
from mask2former.data.offline.synthetic import generate_synthetic_trash


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--output", default="data/trash", help="dataset root to create")
    parser.add_argument("--num-train", type=int, default=80)
    parser.add_argument("--num-val", type=int, default=20)
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--objects-per-image", type=int, nargs=2, default=(1, 5), metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--images-per-batch", type=int, default=100, help="images per batch_NN_vt folder"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    args = parser.parse_args(argv)
    counts = generate_synthetic_trash(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        seed=args.seed,
        objects_per_image=tuple(args.objects_per_image),
        images_per_batch=args.images_per_batch,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"Wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


console_main = console_entry(main)


if __name__ == "__main__":
    sys.exit(console_main())
