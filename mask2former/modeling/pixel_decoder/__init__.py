"""Pixel decoders. Importing registers ``MSDeformAttnPixelDecoder`` in SEM_SEG_HEADS_REGISTRY."""

from .deformable_attention import MSDeformAttn, ms_deform_attn_fast, ms_deform_attn_pytorch
from .msdeformattn import MSDeformAttnPixelDecoder

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "ms_deform_attn_fast",
    "ms_deform_attn_pytorch",
]
