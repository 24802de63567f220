#!/usr/bin/env python
"""Multi-label stratified k-fold split of a COCO json (labels = classes present per image).

Same as ``m2f-kfold`` (``python -m mask2former.cli.kfold_split``); see that module.
"""

import sys

from mask2former.cli.kfold_split import console_main

if __name__ == "__main__":
    sys.exit(console_main())
