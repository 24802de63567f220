#!/usr/bin/env python
"""Train / evaluate Mask2Former, SeMask and DiNAT models for semantic segmentation.

Same as ``m2f-train`` (``python -m mask2former.cli.train``); see that module.
"""

import sys

from mask2former.cli.train import console_main

if __name__ == "__main__":
    sys.exit(console_main())
