#!/usr/bin/env python
"""Write a deterministic synthetic trash dataset in the competition format.

Same as ``m2f-synthetic`` (``python -m mask2former.cli.prepare_synthetic_trash``); see that module.
"""

import sys

from mask2former.cli.prepare_synthetic_trash import console_main

if __name__ == "__main__":
    sys.exit(console_main())
