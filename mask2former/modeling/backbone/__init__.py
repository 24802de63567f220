"""Backbones. Importing registers ``D2SwinTransformer`` in Detectron2's BACKBONE_REGISTRY."""

from .swin import D2SwinTransformer, SwinTransformer
from .swin_convert import convert_swin_checkpoint, convert_swin_state_dict

__all__ = [
    "D2SwinTransformer",
    "SwinTransformer",
    "convert_swin_checkpoint",
    "convert_swin_state_dict",
]
