#!/usr/bin/env python
"""Predict a registered dataset: submission CSV, probability dump, overlay pictures, LB score.

Same as ``m2f-predict`` (``python -m mask2former.cli.predict``); see that module.
"""

import sys

from mask2former.cli.predict import console_main

if __name__ == "__main__":
    sys.exit(console_main())
