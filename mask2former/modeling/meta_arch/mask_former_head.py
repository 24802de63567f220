"""The Mask2Former segmentation head: a pixel decoder followed by a transformer decoder."""

from typing import Dict, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..transformer_decoder.registry import build_transformer_decoder


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """
    Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from
    SEM_SEG_HEADS_REGISTRY. It must provide ``forward_features(features)`` returning
    ``(mask_features, transformer_encoder_features, multi_scale_features)``.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"pixel decoder {name} has no forward_features method")
    return model


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """
    Mask-classification head: ``pixel_decoder.forward_features`` turns backbone features into
    mask features (1/4 scale) and multi-scale features, which the transformer decoder
    (``predictor``) turns into per-query class and mask logits.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str = "multi_scale_pixel_decoder",
    ):
        """
        Args:
            input_shape: shapes of the backbone features the head uses.
            num_classes: number of classes.
            pixel_decoder: module with ``forward_features``.
            loss_weight: kept for config compatibility (losses are weighted by the criterion).
            ignore_value: label ignored in per-pixel targets.
            transformer_predictor: the transformer decoder.
            transformer_in_feature: which pixel-decoder output feeds the transformer decoder;
                only "multi_scale_pixel_decoder" (Mask2Former) is supported.
        """
        super().__init__()
        if transformer_in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                "MaskFormerHead supports MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE="
                f"'multi_scale_pixel_decoder' only, got {transformer_in_feature!r}"
            )
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return {
            "input_shape": {
                k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
            },
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_in_feature": cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE,
            "transformer_predictor": build_transformer_decoder(
                cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
            ),
        }

    def forward(self, features: Dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None):
        """
        Args:
            features: backbone outputs by name.
            mask: unused padding mask (passed on to the predictor, which ignores it).

        Returns:
            the predictor's dict ("pred_logits", "pred_masks", "aux_outputs").
        """
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask)
