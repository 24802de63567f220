#!/usr/bin/env python
"""Export a trained semantic model (Mask2Former Swin, SeMask, DiNAT) to ONNX at a fixed size.

Same as ``m2f-export-onnx`` (``python -m mask2former.cli.export_onnx``); see that module.
"""

import sys

from mask2former.cli.export_onnx import console_main

if __name__ == "__main__":
    sys.exit(console_main())
