#!/usr/bin/env python
"""Write a self-contained HTML report of a dataset and, with --weights, of a model on it.

Same as ``m2f-report`` (``python -m mask2former.cli.report``); see that module.
"""

import sys

from mask2former.cli.report import console_main

if __name__ == "__main__":
    sys.exit(console_main())
