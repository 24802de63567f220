"""Convert label-map PNGs to a COCO polygon json (one annotation per connected component per
class, holes kept; see mask2former/data/offline/convert_labelmaps.py).

    m2f-labelmap-to-coco --labels camvid/val/labels --images camvid/val/images \
        --output camvid_val.json --ignore-label 11 --no-background \
        --class-names Sky Building Pole Road Pavement Tree SignSymbol Fence Car Pedestrian Bicyclist

The json's info.uncovered records what pixels without a polygon are: "ignore" with
--no-background (register with DATASETS.COCO_SEMSEG [[name, json, image_root, "ignore"]]; the
registration defaults to it and refuses "background"), else "background".
"""

import sys

from mask2former.cli.command import console_entry, tool_parser
from mask2former.data.offline.convert_labelmaps import labelmaps_to_coco


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--labels", required=True, help="folder of label PNGs")
    parser.add_argument("--output", required=True, help="COCO json to write")
    parser.add_argument(
        "--images", default=None, help="folder of the images (file_name = <stem><ext>)"
    )
    parser.add_argument("--image-ext", default=".jpg")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--class-names", nargs="+", help="name of each label value")
    group.add_argument("--num-classes", type=int, help="name the classes 0..N-1")
    parser.add_argument("--ignore-label", type=int, default=255)
    parser.add_argument("--background", type=int, default=0, help="label without annotations")
    parser.add_argument("--no-background", action="store_true", help="every label value is a class")
    parser.add_argument(
        "--min-area", type=int, default=0, help="components below this many pixels are small"
    )
    parser.add_argument("--small", choices=("drop", "keep"), default="drop")
    args = parser.parse_args(argv)
    class_names = args.class_names or [str(i) for i in range(args.num_classes)]
    stats = labelmaps_to_coco(
        args.labels,
        args.output,
        class_names,
        image_dir=args.images,
        image_ext=args.image_ext,
        ignore_label=args.ignore_label,
        background=None if args.no_background else args.background,
        min_area=args.min_area,
        small=args.small,
        progress=True,
    )
    print(f"Wrote {args.output}: {stats}")


console_main = console_entry(main)


if __name__ == "__main__":
    sys.exit(console_main())
