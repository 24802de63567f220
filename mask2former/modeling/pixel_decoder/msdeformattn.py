"""Mask2Former's multi-scale deformable-attention pixel decoder.

A deformable-attention transformer encoder (Deformable DETR, encoder only) over the coarsest
backbone features (1/8, 1/16, 1/32 by default), then an FPN adds the finer features (1/4) and a
1x1 conv gives the per-pixel mask features. Module and parameter names follow the official code so
that its checkpoints load unchanged.
"""

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..layers import PointwiseConv2d
from ..point_sampling import resize_bilinear
from ..position_encoding import PositionEmbeddingSine
from .deformable_attention import MSDeformAttn, SpatialShapes

__all__ = [
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnPixelDecoder",
]


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention (``self_attn``, ``norm1``) and a ReLU
    FFN (``linear1``, ``linear2``, ``norm2``)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=attention_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor],
        reference_points: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """src, pos [N, S, C]; reference_points [N, S, L, 2]; spatial_shapes [L, 2] (tensor or
        list of (H, W)); padding_mask [N, S] or None."""
        query = src if pos is None else src + pos
        attn = self.self_attn(
            query, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attn))
        hidden = self.linear1(src)
        # In place without autograd only: the linear's output is a view (of the 2-D product),
        # and an in-place ReLU on a view makes backward clone and copy the whole activation.
        hidden = F.relu(hidden, inplace=not hidden.requires_grad)
        ffn = self.linear2(self.dropout2(hidden))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of an encoder layer (``layers.{i}``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(
        spatial_shapes: Sequence[Tuple[int, int]], valid_ratios: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid (non-padded) size of their own
        level and re-scaled to each level's valid size: [N, S, L, 2] (x, y)."""
        reference_points = []
        for level, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            reference_points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # a tuple of Python (H, W) pairs, read once (a device sync on GPU for a tensor) and
        # passed as such to every layer's deformable attention (no read-back there)
        if isinstance(spatial_shapes, torch.Tensor):
            spatial_shapes = spatial_shapes.tolist()
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
        reference_points = self.get_reference_points(shapes, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable DETR's encoder over several feature levels, with a learned level embedding
    (``level_embed``) added to the position embeddings."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        encoder_layer = MSDeformAttnTransformerEncoderLayer(
            d_model,
            dim_feedforward,
            dropout,
            num_feature_levels,
            nhead,
            enc_n_points,
            attention_impl,
        )
        self.encoder = MSDeformAttnTransformerEncoder(encoder_layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """Fraction of valid columns / rows of a padding mask [N, H, W]: [N, 2] (x, y)."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(
        self,
        srcs: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        masks: Optional[List[torch.Tensor]] = None,
    ):
        """
        Args:
            srcs: per level [N, C, H_l, W_l].
            pos_embeds: per level [N, C, H_l, W_l].
            masks: optional per level bool [N, H_l, W_l], True on padding. None: no padding.

        Returns:
            memory [N, S, C], spatial_shapes [L, 2] (long), level_start_index [L] (long).
        """
        src_flatten, pos_flatten, shapes = [], [], []
        for level, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            level_embed = self.level_embed[level].view(1, 1, -1)
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + level_embed)
        src_flatten = torch.cat(src_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        if masks is None:
            # no padding: valid ratios of 1 (what the official code computes from all-False masks)
            valid_ratios = src_flatten.new_ones(src_flatten.shape[0], len(srcs), 2)
            mask_flatten = None
        else:
            valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
            mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        # the shapes as python ints (graph exporters cannot read ints back from a tensor)
        memory = self.encoder(
            src_flatten, shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten
        )
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former: deformable transformer encoder + FPN + mask features.

    Precision: by default the whole decoder runs in float32 even under an enclosing autocast
    (the official behaviour, kept for SOLVER.AMP training). With ``inference_autocast`` (set
    from MODEL.PRECISION bf16 / fp16), in eval mode an enclosing autocast reaches its
    projections, FFNs and convolutions; the deformable-attention sampling still runs in float32
    (``MSDeformAttn`` disables autocast around it).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
        attention_impl: str = "auto",
        inference_autocast: bool = False,
    ):
        """
        Args:
            input_shape: shapes (channels, stride) of the input features.
            transformer_dropout: dropout in the encoder.
            transformer_nheads: heads of the deformable attention.
            transformer_dim_feedforward: FFN width of the encoder.
            transformer_enc_layers: number of encoder layers.
            conv_dim: channels of the encoder and of the FPN.
            mask_dim: channels of the mask features.
            norm: normalisation of the FPN convs.
            transformer_in_features: input features the encoder attends over.
            common_stride: stride of the mask features (the FPN goes down to it).
            transformer_n_points: sampling points per head and level.
            attention_impl: "fast", "pytorch" or "auto" deformable attention (see MSDeformAttn).
            inference_autocast: in eval mode, let an enclosing autocast reach the layers (only
                the deformable sampling stays float32); False, and always in training: the whole
                decoder runs in float32.
        """
        super().__init__()
        transformer_input_shape = sorted(
            ((k, v) for k, v in input_shape.items() if k in transformer_in_features),
            key=lambda x: x[1].stride,
        )
        input_shape = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape]  # fine to coarse
        self.feature_strides = [v.stride for _, v in input_shape]
        self.feature_channels = [v.channels for _, v in input_shape]

        self.inference_autocast = inference_autocast
        self.transformer_in_features = [k for k, _ in transformer_input_shape]  # fine to coarse
        transformer_in_channels = [v.channels for _, v in transformer_input_shape]
        self.transformer_feature_strides = [v.stride for _, v in transformer_input_shape]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # 1x1 conv + GroupNorm per encoder level, ordered from the lowest resolution
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(PointwiseConv2d(in_channels, conv_dim), nn.GroupNorm(32, conv_dim))
                for in_channels in transformer_in_channels[::-1]
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            attention_impl=attention_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = PointwiseConv2d(conv_dim, mask_dim)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # always use 3 scales
        self.common_stride = common_stride

        # FPN levels for the features finer than the encoder's
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(np.log2(stride) - np.log2(self.common_stride))
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = PointwiseConv2d(
                in_channels, conv_dim, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # top-down order (low to high resolution)
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS != cfg.MODEL.MASK_FORMER.NHEADS:
            raise ValueError(
                "The deformable encoder uses MODEL.MASK_FORMER.NHEADS heads (official code); "
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS="
                f"{head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS} differs from it "
                f"({cfg.MODEL.MASK_FORMER.NHEADS}); set both to the same value."
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            # the official code uses 1024 for the encoder, not MASK_FORMER.DIM_FEEDFORWARD
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "common_stride": head.COMMON_STRIDE,
            "attention_impl": head.DEFORMABLE_ATTENTION_IMPL,
            # low-precision inference reaches the decoder's layers (MaskFormer sets the autocast)
            "inference_autocast": cfg.MODEL.PRECISION != "fp32",
        }

    def forward_features(
        self, features: Dict[str, torch.Tensor], padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone features by name.
            padding_mask: optional bool [N, H, W] at image resolution, True on padded pixels
                (the official code has none: without it, padding is treated as image content).
                Resized (nearest) to every encoder level; padded positions get no attention
                and the position embeddings and reference points cover the valid region only.

        Returns:
            mask_features [N, mask_dim, H/4, W/4]; the coarsest encoder output
            [N, conv_dim, H/32, W/32]; multi-scale features, 3 maps of conv_dim channels from
            the lowest resolution (1/32, 1/16, 1/8).
        """
        if self.inference_autocast and not self.training:
            # the enclosing autocast (if any) reaches the layers; the sampling op runs in fp32
            return self._forward_features(features, padding_mask)
        # Deformable attention needs fp32 sampling locations: run everything in fp32 (official).
        with torch.autocast(device_type=next(iter(features.values())).device.type, enabled=False):
            return self._forward_features(features, padding_mask)

    def _forward_features(self, features, padding_mask):
        srcs, pos, masks = [], [], None if padding_mask is None else []
        for idx, f in enumerate(self.transformer_in_features[::-1]):  # low to high resolution
            x = features[f].float()
            mask = None
            if padding_mask is not None:
                mask = F.interpolate(padding_mask[None].float(), size=x.shape[-2:])[0].bool()
                masks.append(mask)
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x, mask))

        y = self.transformer(srcs, pos, masks)[0]
        bs = y.shape[0]
        shapes = [src.shape[-2:] for src in srcs]
        out = [
            z.transpose(1, 2).reshape(bs, -1, h, w)
            for z, (h, w) in zip(y.split([h * w for h, w in shapes], dim=1), shapes)
        ]

        # FPN for the finer features, top-down
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur_fpn = self.lateral_convs[idx](x)
            # F.interpolate(mode="bilinear") as two matrix products (4x faster on CPU, forward and
            # backward); the encoder's outputs are channels-last views, resized as contiguous
            # copies to give an NCHW result that adds without strided reads
            top_down = resize_bilinear(out[-1].contiguous(), cur_fpn.shape[-2:])
            y = cur_fpn + top_down
            out.append(self.output_convs[idx](y))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(
        self, features: Dict[str, torch.Tensor], padding_mask: Optional[torch.Tensor] = None
    ):
        """Same as :meth:`forward_features`."""
        return self.forward_features(features, padding_mask)
