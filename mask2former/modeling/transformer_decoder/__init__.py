"""Transformer decoders of mask-classification heads; importing registers them."""

from .mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder
from .registry import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
]
