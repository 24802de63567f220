"""Mask-classification head and meta-architecture; importing registers them."""

from .mask_former_head import MaskFormerHead, build_pixel_decoder
from .mask_former_model import MaskFormer, resized_semantic_inference, semantic_inference_naive

__all__ = [
    "MaskFormerHead",
    "build_pixel_decoder",
    "MaskFormer",
    "resized_semantic_inference",
    "semantic_inference_naive",
]
