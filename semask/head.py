"""The SeMask semantic branch: per-stage class maps summed FPN-style and upsampled to the input.

:class:`SemanticBranchHead` is the official "SemanticHead" (it has no parameters);
:class:`BranchMaskFormerHead` (the official registered name) is the Mask2Former head plus that
branch, computed from the class maps the SeMask backbone puts in its output dict.
"""

import math
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from mask2former.modeling.meta_arch import MaskFormerHead

from .backbone import seg_map_key

__all__ = ["BRANCH_OUTPUT_KEY", "SemanticBranchHead", "BranchMaskFormerHead"]

# Key of the semantic-branch logits [B, K, H, W] in the predictions of BranchMaskFormerHead.
BRANCH_OUTPUT_KEY = "pred_branch_sem_seg"


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class SemanticBranchHead(nn.Module):
    """Sum of class maps at several strides, as in the official SeMask code.

    The map of stride ``s`` is upsampled ``log2(s / s0)`` times by 2 (bilinear, corners aligned)
    and resized to the finest map (stride ``s0``); the sum is upsampled by ``s0`` (bilinear,
    corners aligned), i.e. to the (padded) input size. The official code hard-codes the last
    factor to 4, the stride of "res2", which every official config uses as finest feature.

    Args:
        feature_strides: strides of the maps, increasing (each a power-of-two multiple of the
            first).
    """

    def __init__(self, feature_strides: Sequence[int]):
        super().__init__()
        strides = [int(s) for s in feature_strides]
        if not strides:
            raise ValueError("feature_strides is empty")
        num_upsamplings = []
        for stride in strides:
            ratio = stride / strides[0]
            steps = round(math.log2(ratio)) if ratio >= 1 else -1
            if steps < 0 or 2**steps != ratio:
                raise ValueError(
                    f"feature_strides {strides} must increase by powers of two from the first"
                )
            num_upsamplings.append(steps)
        self.feature_strides = strides
        self.num_upsamplings = num_upsamplings

    def forward(self, seg_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            seg_maps: one [B, K, h_i, w_i] map per stride, in ``feature_strides`` order.

        Returns:
            [B, K, s0 * h_0, s0 * w_0] logits.
        """
        if len(seg_maps) != len(self.feature_strides):
            raise ValueError(
                f"expected {len(self.feature_strides)} class maps, got {len(seg_maps)}"
            )
        output = seg_maps[0]
        for seg_map, steps in zip(seg_maps[1:], self.num_upsamplings[1:]):
            for _ in range(steps):
                seg_map = _upsample2x(seg_map)
            output = output + F.interpolate(
                seg_map, size=output.shape[-2:], mode="bilinear", align_corners=True
            )
        h, w = output.shape[-2:]
        scale = self.feature_strides[0]
        return F.interpolate(
            output, size=(h * scale, w * scale), mode="bilinear", align_corners=True
        )

    def extra_repr(self) -> str:
        return f"feature_strides={self.feature_strides}"


@SEM_SEG_HEADS_REGISTRY.register()
class BranchMaskFormerHead(MaskFormerHead):
    """:class:`MaskFormerHead` plus the semantic branch (``sem_head``, no parameters).

    In training, the predictions also hold the branch logits under :data:`BRANCH_OUTPUT_KEY`,
    from the class maps ``features[seg_map_key(name)]`` of the head's input features (a SeMask
    backbone provides them). Inference does not use the branch (as in the official code), so it
    is not computed in eval mode; :meth:`forward_branch` computes it on demand.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], **kwargs):
        """
        Args:
            input_shape, kwargs: see :class:`MaskFormerHead`.
        """
        super().__init__(input_shape, **kwargs)
        self.sem_head = SemanticBranchHead([input_shape[name].stride for name in self.in_features])

    def forward_branch(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Semantic-branch logits [B, K, H, W] from the class maps in ``features``."""
        missing = [name for name in self.in_features if seg_map_key(name) not in features]
        if missing:
            raise KeyError(
                "BranchMaskFormerHead needs the class maps "
                f"{[seg_map_key(n) for n in missing]} in the "
                "backbone output; use a SeMask backbone "
                "(MODEL.BACKBONE.NAME D2SeMaskSwinTransformer)"
            )
        return self.sem_head([features[seg_map_key(name)] for name in self.in_features])

    def forward(self, features: Dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None):
        """
        Returns:
            the predictor's dict ("pred_logits", "pred_masks", "aux_outputs") and, in training,
            :data:`BRANCH_OUTPUT_KEY`.
        """
        predictions = super().forward(features, mask)
        if self.training:
            predictions[BRANCH_OUTPUT_KEY] = self.forward_branch(features)
        return predictions
