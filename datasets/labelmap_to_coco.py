#!/usr/bin/env python
"""Convert label-map PNGs to a COCO polygon json (one annotation per connected component per

Same as ``m2f-labelmap-to-coco`` (``python -m mask2former.cli.labelmap_to_coco``); see that module.
"""

import sys

from mask2former.cli.labelmap_to_coco import console_main

if __name__ == "__main__":
    sys.exit(console_main())
