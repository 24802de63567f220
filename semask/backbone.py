"""SeMask Swin backbone (Jain et al. 2021): a Swin Transformer with a semantic layer after every
stage.

The semantic layer normalises the stage output (``norm1``) and runs ``NUM_SEM_BLOCKS``
:class:`SemanticAttention` blocks (``class_injection``) on it, within non-overlapping windows of
``SEM_WINDOW_SIZE`` (windowed stages) or over the whole map (global stages). Each block predicts
per-token class logits ``seg_map`` and class features ``seg_ft`` and adds
``gamma * mlp_res(softmax(seg_map @ seg_ft^T) @ mlp_v(x))`` to its input. The stage output is the
output of the semantic layer: it feeds the patch merging and the output norm ``norm{i}``.

Parameter names follow the official SeMask-Mask2Former code, so its checkpoints load with no
missing or unexpected keys: the Swin names of :mod:`mask2former.modeling.backbone.swin` plus
``layers.{i}.semantic_layer.norm1`` and
``layers.{i}.semantic_layer.class_injection.{j}.{mlp_cls_q, mlp_cls_k, mlp_v, mlp_res, gamma}``.

Backbone contract: the official backbone returns a pair ``(features, class_maps)``; here
``forward`` returns one dict, Detectron2's contract. It holds the features "res2".."res5"
described by :meth:`~D2SeMaskSwinTransformer.output_shape` and, for each of them, the stage's class
logits [B, K, h, w] under ``seg_map_key(name)`` ("seg_map_res2", ...). Those extra entries are not
in ``output_shape()``, so pixel decoders (which read the features they were built for) ignore
them; :func:`split_seg_maps` separates the two.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn
from torch.nn import functional as F

from mask2former.modeling.backbone.swin import (
    D2SwinTransformer,
    StageOutput,
    SwinStage,
    window_layout,
)

__all__ = [
    "SEG_MAP_PREFIX",
    "seg_map_key",
    "split_seg_maps",
    "SemanticAttention",
    "SemanticLayer",
    "SeMaskSwinStage",
    "D2SeMaskSwinTransformer",
]

# Backbone-output key of the class map of feature "resN": SEG_MAP_PREFIX + "resN".
SEG_MAP_NAME = "seg_map"
SEG_MAP_PREFIX = SEG_MAP_NAME + "_"


def seg_map_key(feature_name: str) -> str:
    """Key of the class logits of backbone feature ``feature_name`` in the backbone output."""
    return SEG_MAP_PREFIX + feature_name


def split_seg_maps(
    outputs: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split a SeMask backbone output into (features, class maps keyed by feature name)."""
    features = {k: v for k, v in outputs.items() if not k.startswith(SEG_MAP_PREFIX)}
    seg_maps = {
        k[len(SEG_MAP_PREFIX) :]: v for k, v in outputs.items() if k.startswith(SEG_MAP_PREFIX)
    }
    return features, seg_maps


def _linear_in(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in the dtype of ``x`` whatever the dtype of the layer's weights."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class SemanticAttention(nn.Module):
    """One semantic-attention block ("SemanticAttention" in the official code).

    For tokens x [G, N, C] (G groups of N tokens: windows, or whole maps)::

        seg_map = mlp_cls_q(x)                      # [G, N, K] class logits
        seg_ft  = mlp_cls_k(x)                      # [G, N, K] class features
        attn    = softmax(seg_map @ seg_ft^T)       # [G, N, N], no scaling, one head
        out     = x + gamma * dropout(mlp_res(attn @ mlp_v(x)))

    Initialisation (official): Kaiming-normal weights and zero biases, ``mlp_res`` all zeros,
    ``gamma`` 0, so the block is the identity at initialisation. Note that with both ``gamma``
    and ``mlp_res`` at zero, neither receives a gradient (each one's gradient is proportional to
    the other), so when trained from this initialisation the residual stays zero and only
    ``mlp_cls_q`` learns, through the loss on the class maps; this is the official behaviour.

    Args:
        dim: channels C.
        num_classes: classes K of the class logits.
        proj_drop: dropout on the residual (official: 0.1).
    """

    # the backbone's Swin initialisation leaves these layers with the official one below
    keeps_own_init = True

    def __init__(self, dim: int, num_classes: int, proj_drop: float = 0.1):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation (see the class docstring)."""
        for layer in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: [G, N, C] tokens.

        Returns:
            (class logits ``seg_map`` [G, N, K], output tokens [G, N, C]).
        """
        # Unscaled logits over a head dimension of K classes overflow half precision (an inf,
        # then NaN that ``gamma * feats`` spreads even at gamma 0): under autocast the block
        # runs in fp32 (or the input's wider dtype), and only the residual returns in x's dtype.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_wide = x.to(dtype)
            seg_map = _linear_in(self.mlp_cls_q, x_wide)
            seg_ft = _linear_in(self.mlp_cls_k, x_wide)
            values = _linear_in(self.mlp_v, x_wide)
            # one head as a [G, 1, N, .] batch: the 4-D layout that every backend and exporter
            # (ONNX) takes; same numbers as the 3-D call
            feats = F.scaled_dot_product_attention(
                seg_map[:, None], seg_ft[:, None], values[:, None], scale=1.0
            )[:, 0]
            feats = self.proj_drop(_linear_in(self.mlp_res, feats))
            return seg_map, x + (self.gamma.to(dtype) * feats).to(x.dtype)


class SemanticLayer(nn.Module):
    """The semantic layer of a stage: ``norm1`` then ``num_sem_blocks`` :class:`SemanticAttention`
    blocks (``class_injection``), in windows or global ("SWSeMaskBlock" / "SeMaskBlock" in the
    official code, which have the same parameters).

    Windowed: the normalised map is zero-padded at the bottom / right to multiples of
    ``window_size`` and split into windows (no shift); padded tokens take part as keys, as in the
    official code, and are dropped from the outputs.

    Args:
        dim: channels.
        num_classes: classes of the class logits.
        window_size: window side (windowed only).
        num_sem_blocks: number of semantic-attention blocks (>= 1).
        windowed: attention within windows (True) or over the whole map (False).
        norm_layer: normalisation layer class.
        proj_drop: dropout of the blocks' residuals.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        window_size: int = 7,
        num_sem_blocks: int = 1,
        windowed: bool = True,
        norm_layer=nn.LayerNorm,
        proj_drop: float = 0.1,
    ):
        super().__init__()
        if num_sem_blocks < 1:
            raise ValueError(f"num_sem_blocks must be >= 1, got {num_sem_blocks}")
        if windowed and window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.dim = dim
        self.num_classes = num_classes
        self.window_size = window_size
        self.windowed = windowed
        self.norm1 = norm_layer(dim)
        self.class_injection = nn.ModuleList(
            SemanticAttention(dim, num_classes, proj_drop=proj_drop) for _ in range(num_sem_blocks)
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: [B, h*w, C] stage output tokens.

        Returns:
            (class logits of the last block [B, h*w, K], output tokens [B, h*w, C]).
        """
        if x.shape[1] != h * w:
            raise ValueError(f"input has {x.shape[1]} tokens, expected {h} x {w}")
        x = self.norm1(x)
        layout = window_layout(h, w, self.window_size, 0, x.device) if self.windowed else None
        if layout is not None:
            x = layout.partition(x)
        for block in self.class_injection:
            seg_map, x = block(x)
        if layout is not None:
            seg_map, x = layout.reverse(seg_map), layout.reverse(x)
        return seg_map, x

    def extra_repr(self) -> str:
        mode = f"window_size={self.window_size}" if self.windowed else "global"
        return f"num_classes={self.num_classes}, {mode}"


class SeMaskSwinStage(SwinStage):
    """A Swin stage ("BasicLayer") followed by its :class:`SemanticLayer` (``semantic_layer``),
    which runs before the patch merging.

    Args:
        num_classes, sem_window_size, num_sem_blocks, sem_windowed: the semantic layer's
            ``num_classes``, ``window_size``, ``num_sem_blocks`` and ``windowed``.
        stage_kwargs: arguments of :class:`SwinStage`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        sem_window_size: int = 7,
        num_sem_blocks: int = 1,
        sem_windowed: bool = True,
        **stage_kwargs,
    ):
        super().__init__(**stage_kwargs)
        self.semantic_layer = SemanticLayer(
            stage_kwargs["dim"],
            num_classes,
            window_size=sem_window_size,
            num_sem_blocks=num_sem_blocks,
            windowed=sem_windowed,
            norm_layer=stage_kwargs.get("norm_layer", nn.LayerNorm),
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> StageOutput:
        """Stage output [B, h*w, C], next-stage input, its h, its w, and the class logits
        [B, h*w, K] as the map ``"seg_map"`` (backbone output key ``seg_map_key(name)``)."""
        x = self.forward_blocks(x, h, w)
        seg_map, x = self.semantic_layer(x, h, w)
        x_down, next_h, next_w = self.forward_downsample(x, h, w)
        return StageOutput(x, x_down, next_h, next_w, {SEG_MAP_NAME: seg_map})


@BACKBONE_REGISTRY.register()
class D2SeMaskSwinTransformer(D2SwinTransformer):
    """SeMask Swin backbone for Detectron2 (the official registered name).

    Same features, strides, channels and size divisibility as :class:`D2SwinTransformer`, plus
    the class logits of every returned stage under ``seg_map_key(name)`` (see the module
    docstring). Built from ``cfg.MODEL.SWIN`` (with ``SEM_WINDOW_SIZE``, ``NUM_SEM_BLOCKS``,
    ``SEM_GLOBAL_STAGES``) and ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        sem_window_size: int = 7,
        num_sem_blocks: int = 1,
        sem_global_stages: Sequence[int] = (),
        **kwargs,
    ):
        """
        Args:
            num_classes: classes K of the class maps (the dataset's, background included).
            sem_window_size: window side of windowed semantic attention.
            num_sem_blocks: semantic-attention blocks per stage (>= 1).
            sem_global_stages: stage indices whose semantic attention is global.
            kwargs: arguments of :class:`D2SwinTransformer`.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        num_stages = len(kwargs.get("depths", (2, 2, 6, 2)))
        bad = [i for i in sem_global_stages if not 0 <= i < num_stages]
        if bad:
            raise ValueError(f"sem_global_stages {list(sem_global_stages)}: no stage {bad}")
        global_stages = frozenset(sem_global_stages)

        def semask_stage(index: int, **stage_kwargs) -> SeMaskSwinStage:
            return SeMaskSwinStage(
                num_classes=num_classes,
                sem_window_size=sem_window_size,
                num_sem_blocks=num_sem_blocks,
                sem_windowed=index not in global_stages,
                **stage_kwargs,
            )

        super().__init__(stage_factory=semask_stage, **kwargs)
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        args = super().from_config(cfg, input_shape)
        swin = cfg.MODEL.SWIN
        args.update(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            sem_window_size=swin.SEM_WINDOW_SIZE,
            num_sem_blocks=swin.NUM_SEM_BLOCKS,
            sem_global_stages=swin.SEM_GLOBAL_STAGES,
        )
        return args
