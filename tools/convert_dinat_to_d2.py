#!/usr/bin/env python
"""Convert an official DiNAT ImageNet checkpoint into Detectron2 backbone weights.

Same as ``m2f-convert-dinat`` (``python -m mask2former.cli.convert_dinat``); see that module.
"""

import sys

from mask2former.cli.convert_dinat import main

if __name__ == "__main__":
    sys.exit(main())
