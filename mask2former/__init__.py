"""Mask2Former for semantic segmentation, as a Detectron2 project.

Importing the package registers its components with Detectron2's registries (backbones,
heads, meta-architecture, transformer decoders) and its dataset mapper.
"""
from . import data  # noqa: F401  (registers dataset helpers)
from . import modeling  # noqa: F401  (registers models)
from .config import add_maskformer2_config

__all__ = ["add_maskformer2_config"]
