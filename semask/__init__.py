"""SeMask: semantic-attention Swin backbone, semantic branch head, meta-architecture.

Importing the package registers ``D2SeMaskSwinTransformer`` (BACKBONE_REGISTRY),
``BranchMaskFormerHead`` (SEM_SEG_HEADS_REGISTRY) and ``SeMaskMaskFormer`` (META_ARCH_REGISTRY),
the names of the official SeMask-Mask2Former code.
"""

from .backbone import (
    D2SeMaskSwinTransformer,
    SemanticAttention,
    SemanticLayer,
    SeMaskSwinStage,
    seg_map_key,
    split_seg_maps,
)
from .config import add_semask_config
from .head import BRANCH_OUTPUT_KEY, BranchMaskFormerHead, SemanticBranchHead
from .meta_arch import SeMaskMaskFormer, pad_sem_seg_targets, semantic_branch_loss

__all__ = [
    "BRANCH_OUTPUT_KEY",
    "BranchMaskFormerHead",
    "D2SeMaskSwinTransformer",
    "SeMaskMaskFormer",
    "SeMaskSwinStage",
    "SemanticAttention",
    "SemanticBranchHead",
    "SemanticLayer",
    "add_semask_config",
    "pad_sem_seg_targets",
    "seg_map_key",
    "semantic_branch_loss",
    "split_seg_maps",
]
