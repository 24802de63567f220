"""Mask2Former modeling components; importing registers them with Detectron2's registries."""

from .backbone import D2SwinTransformer, SwinTransformer
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .meta_arch import MaskFormer, MaskFormerHead
from .pixel_decoder import MSDeformAttn, MSDeformAttnPixelDecoder
from .transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

__all__ = [
    "D2SwinTransformer",
    "HungarianMatcher",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MaskFormer",
    "MaskFormerHead",
    "MultiScaleMaskedTransformerDecoder",
    "SetCriterion",
    "SwinTransformer",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
]
