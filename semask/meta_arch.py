"""The SeMask Mask2Former meta-architecture: Mask2Former plus a per-pixel cross-entropy on the
semantic branch of a :class:`~semask.head.BranchMaskFormerHead`."""

from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch.nn import functional as F

from mask2former.modeling.meta_arch import MaskFormer

from .head import BRANCH_OUTPUT_KEY

__all__ = ["semantic_branch_loss", "pad_sem_seg_targets", "SeMaskMaskFormer"]


def semantic_branch_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_value: int
) -> torch.Tensor:
    """Mean per-pixel cross-entropy over the pixels whose label is not ``ignore_value``
    (``F.cross_entropy(..., ignore_index=ignore_value)``, the official "loss_cate"), but 0 instead
    of NaN when every pixel is ignored.

    Args:
        logits: [B, K, H, W].
        targets: [B, H, W] int64 labels in [0, K) or ``ignore_value``.
    """
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_value, reduction="sum")
    return total / (targets != ignore_value).sum().clamp(min=1)


def pad_sem_seg_targets(
    sem_segs: List[torch.Tensor], size: Tuple[int, int], ignore_value: int
) -> torch.Tensor:
    """Stack [H_b, W_b] label maps into [B, *size], padding bottom / right with ``ignore_value``."""
    height, width = size
    out = sem_segs[0].new_full((len(sem_segs), height, width), ignore_value, dtype=torch.long)
    for b, sem_seg in enumerate(sem_segs):
        h, w = sem_seg.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"label map of size {(h, w)} is larger than the prediction {size}")
        out[b, :h, :w] = sem_seg
    return out


@META_ARCH_REGISTRY.register()
class SeMaskMaskFormer(MaskFormer):
    """:class:`MaskFormer` whose training losses add ``loss_cate`` = ``cate_weight`` x the
    per-pixel cross-entropy of the semantic branch against the "sem_seg" label maps of the
    inputs (padded with the ignore value to the branch resolution, the padded input size).
    Inference is Mask2Former's (the branch is not used). Use with a SeMask backbone and
    :class:`~semask.head.BranchMaskFormerHead`.
    """

    @configurable
    def __init__(self, *, cate_weight: float, ignore_value: int = 255, **kwargs):
        """
        Args:
            cate_weight: weight of the semantic-branch cross-entropy.
            ignore_value: label of the pixels the branch loss ignores.
            kwargs: arguments of :class:`MaskFormer`.
        """
        super().__init__(**kwargs)
        self.cate_weight = cate_weight
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        args.update(
            cate_weight=cfg.MODEL.MASK_FORMER.CATE_WEIGHT,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
        return args

    def losses(self, outputs, features, batched_inputs, images) -> Dict[str, torch.Tensor]:
        """Mask2Former's weighted losses plus the weighted "loss_cate"."""
        losses = super().losses(outputs, features, batched_inputs, images)
        if BRANCH_OUTPUT_KEY not in outputs:
            raise KeyError(
                f"SeMaskMaskFormer needs the head's semantic branch ({BRANCH_OUTPUT_KEY!r}); use "
                "MODEL.SEM_SEG_HEAD.NAME BranchMaskFormerHead"
            )
        if "sem_seg" not in batched_inputs[0]:
            raise ValueError("SeMaskMaskFormer training inputs need 'sem_seg' label maps")
        branch = outputs[BRANCH_OUTPUT_KEY]
        targets = pad_sem_seg_targets(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            tuple(branch.shape[-2:]),
            self.ignore_value,
        )
        losses["loss_cate"] = (
            semantic_branch_loss(branch, targets, self.ignore_value) * self.cate_weight
        )
        return losses
