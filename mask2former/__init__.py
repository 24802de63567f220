"""Mask2Former for semantic segmentation, as a Detectron2 project.

Importing the package registers its components with Detectron2's registries (backbones,
heads, meta-architecture, transformer decoders); nothing else is loaded (datasets are
registered by ``mask2former.data.register_datasets_from_cfg``).
"""

from . import modeling  # noqa: F401
from .config import add_maskformer2_config

__all__ = ["add_maskformer2_config"]
