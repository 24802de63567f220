"""Registry of the transformer decoders ("predictors") of mask-classification heads."""

from detectron2.utils.registry import Registry

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for transformer decoders, which turn multi-scale pixel-decoder features and the mask
features into per-query class logits and mask logits.

A registered class is called as ``cls(cfg, in_channels, mask_classification)`` and must return an
``nn.Module``.
"""


def build_transformer_decoder(cfg, in_channels, mask_classification=True):
    """
    Build the transformer decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``.

    Args:
        cfg: a detectron2 CfgNode with the Mask2Former keys.
        in_channels (int): channels of the features the decoder attends to.
        mask_classification (bool): whether the decoder predicts a class per query.
    """
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
