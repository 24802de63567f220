"""Multi-label stratified k-fold split of a COCO json (labels = classes present per image).

m2f-kfold data/trash/train_all.json --output data/trash/folds --folds 5
"""

import sys

import numpy as np

from mask2former.cli.command import console_entry, tool_parser
from mask2former.data.offline.kfold import write_kfold_splits


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("json_file", help="COCO json to split (e.g. train_all.json)")
    parser.add_argument(
        "--output", required=True, help="folder for train_fold{k}.json / val_fold{k}.json"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folds = write_kfold_splits(args.json_file, args.output, args.folds, args.seed)
    print(
        f"Wrote {args.folds} splits to {args.output}; "
        f"images per fold: {np.bincount(folds).tolist()}"
    )


console_main = console_entry(main)


if __name__ == "__main__":
    sys.exit(console_main())
