#!/usr/bin/env python
"""Soft-voting ensemble of probability dumps, DenseCRF, agreement overwrite and outputs.

Same as ``m2f-ensemble`` (``python -m mask2former.cli.ensemble``); see that module.
"""

import sys

from mask2former.cli.ensemble import console_main

if __name__ == "__main__":
    sys.exit(console_main())
