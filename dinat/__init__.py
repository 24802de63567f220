"""DiNAT backbone and its neighborhood-attention op.

Importing the package registers the ``D2DiNAT`` backbone with Detectron2's BACKBONE_REGISTRY.
"""

from .backbone import D2DiNAT, DiNAT
from .config import add_dinat_config
from .convert import convert_dinat_checkpoint
from .neighborhood_attention import NeighborhoodAttention2D, na2d

__all__ = [
    "D2DiNAT",
    "DiNAT",
    "NeighborhoodAttention2D",
    "add_dinat_config",
    "convert_dinat_checkpoint",
    "na2d",
]
