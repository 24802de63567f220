#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint to a Detectron2 checkpoint.

Same as ``m2f-convert-swin`` (``python -m mask2former.cli.convert_swin``); see that module.
"""

import sys

from mask2former.cli.convert_swin import main

if __name__ == "__main__":
    sys.exit(main())
