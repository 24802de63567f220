#!/usr/bin/env python
"""Pseudo-label unlabeled images from probability dumps.

Same as ``m2f-pseudo-label`` (``python -m mask2former.cli.pseudo_label``); see that module.
"""

import sys

from mask2former.cli.pseudo_label import console_main

if __name__ == "__main__":
    sys.exit(console_main())
