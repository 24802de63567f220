"""DiNAT backbone (Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022).

Module and parameter names follow the official code (SHI-Labs/Neighborhood-Attention-Transformer,
``classification/nat.py`` and ``mask2former/dinat.py``) so that official checkpoints load unchanged:

    patch_embed.proj.{0,1}              two stride-2 3x3 convolutions (the conv tokenizer)
    patch_embed.norm                    LayerNorm
    levels.{i}.blocks.{j}.norm1         LayerNorm
    levels.{i}.blocks.{j}.attn.qkv      Linear(C, 3C)
    levels.{i}.blocks.{j}.attn.rpb      relative positional bias [heads, 2k-1, 2k-1]
    levels.{i}.blocks.{j}.attn.proj     Linear(C, C)
    levels.{i}.blocks.{j}.norm2         LayerNorm
    levels.{i}.blocks.{j}.mlp.fc1/fc2   MLP
    levels.{i}.blocks.{j}.gamma1/gamma2 layer scale (only when enabled)
    levels.{i}.downsample.reduction     stride-2 3x3 convolution C -> 2C, no bias (levels 0..2)
    levels.{i}.downsample.norm          LayerNorm
    norm{i}                             LayerNorm of output level i (Detectron2 backbone only)

Features are kept channels-last (``[B, H, W, C]``) inside the network, as in the official code.
"""

from typing import Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from mask2former.modeling.layers import DropPath, Mlp, in_weight_dtype

from .neighborhood_attention import NeighborhoodAttention2D

__all__ = ["D2DiNAT", "DiNAT", "NATBlock"]

_LEVEL_NAMES = ("res2", "res3", "res4", "res5")


class ConvTokenizer(nn.Module):
    """Image ``[B, 3, H, W]`` -> tokens ``[B, H/4, W/4, C]`` by two stride-2 3x3 convolutions.

    The first convolution, on the image, runs in the weights' dtype even under autocast: in
    bfloat16 (8 significant bits) the normalised image itself would lose up to about one
    intensity level; that convolution is a negligible share of the arithmetic.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = in_weight_dtype(self.proj[0], x)
        return self.norm(self.proj[1](x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Tokens ``[B, H, W, C]`` -> ``[B, H/2, W/2, 2C]``: stride-2 3x3 convolution + LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """Pre-norm transformer block with (dilated) neighborhood attention and an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
        rpb: bool = True,
        attention_impl: str = "auto",
        pad_small_inputs: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            dilation=dilation,
            bias=rpb,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            impl=attention_impl,
            pad_small_inputs=pad_small_inputs,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x):
        attn = self.attn(self.norm1(x))
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * attn)
            return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(attn)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class NATLevel(nn.Module):
    """One level: ``blocks`` at a fixed resolution, then an optional ``downsample``."""

    def __init__(
        self,
        dim: int,
        dilations: Sequence[int],
        drop_paths: Sequence[float],
        downsample: bool,
        **block_kwargs,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                NATBlock(dim, dilation=d, drop_path=p, **block_kwargs)
                for d, p in zip(dilations, drop_paths)
            ]
        )
        self.downsample = ConvDownsampler(dim) if downsample else None

    def forward(self, x):
        """Returns ``(level output, input of the next level)``."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class DiNAT(Backbone):
    """DiNAT as a Detectron2 backbone returning ``res2..res5`` (strides 4..32), each normalised by
    its own LayerNorm ``norm{i}``.

    Args:
        in_chans: input channels.
        embed_dim: channels of level 0 (doubled at every level).
        depths: blocks per level.
        num_heads: attention heads per level.
        kernel_size: neighborhood size ``k`` (odd).
        dilations: per level, the dilation of every block; None = all 1 (NAT).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias, qk_scale: qkv projection bias; logit scale (None: head_dim ** -0.5).
        drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: attention dropout (must be 0).
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks to this rate.
        layer_scale: initial value of the per-channel residual scales ``gamma1/gamma2``; None = off.
        rpb: learn the relative positional bias.
        attention_impl: neighborhood attention implementation (see ``neighborhood_attention``).
        pad_small_inputs: zero-pad feature maps smaller than ``kernel_size * dilation`` (official
            behaviour) instead of raising.
        out_features: subset of ``res2..res5`` to return.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilations: Optional[Sequence[Sequence[int]]] = None,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: Optional[float] = None,
        rpb: bool = True,
        attention_impl: str = "auto",
        pad_small_inputs: bool = True,
        out_features: Sequence[str] = _LEVEL_NAMES,
    ):
        super().__init__()
        num_levels = len(depths)
        if num_levels != len(_LEVEL_NAMES) or len(num_heads) != num_levels:
            raise ValueError(f"DiNAT needs 4 levels: got depths {depths}, num_heads {num_heads}.")
        if dilations is None:
            dilations = [[1] * depth for depth in depths]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(
                f"DILATIONS {dilations} must list one dilation per block of DEPTHS {depths}."
            )
        unknown = set(out_features) - set(_LEVEL_NAMES)
        if unknown:
            raise ValueError(
                f"Unknown DiNAT out_features {sorted(unknown)}; choose from {_LEVEL_NAMES}."
            )

        self.num_features = [embed_dim * 2**i for i in range(num_levels)]
        self._out_features = list(out_features)
        self._out_feature_strides = {name: 4 * 2**i for i, name in enumerate(_LEVEL_NAMES)}
        self._out_feature_channels = dict(zip(_LEVEL_NAMES, self.num_features))

        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        # Only the levels up to the last returned one are built (and that one without its
        # downsampler): parameters that never receive a gradient would make
        # DistributedDataParallel fail. With every level returned this is the official layout.
        built = max(_LEVEL_NAMES.index(name) for name in self._out_features) + 1
        self.levels = nn.ModuleList()
        for i in range(built):
            first = sum(depths[:i])
            self.levels.append(
                NATLevel(
                    self.num_features[i],
                    dilations[i],
                    drop_paths[first : first + depths[i]],
                    downsample=i < built - 1,
                    num_heads=num_heads[i],
                    kernel_size=kernel_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    layer_scale=layer_scale,
                    rpb=rpb,
                    attention_impl=attention_impl,
                    pad_small_inputs=pad_small_inputs,
                )
            )
        for i, name in enumerate(_LEVEL_NAMES):
            if name in self._out_features:
                self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x):
        """``x``: ``[B, C, H, W]`` -> ``{name: [B, C_i, ceil(H / s_i), ceil(W / s_i)]}``."""
        if x.dim() != 4:
            raise ValueError(f"DiNAT takes an input of shape (N, C, H, W), got {tuple(x.shape)}.")
        x = self.patch_embed(x)
        outputs = {}
        for i, (name, level) in enumerate(zip(_LEVEL_NAMES, self.levels)):
            out, x = level(x)
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
class D2DiNAT(DiNAT):
    """:class:`DiNAT` built from ``cfg.MODEL.DINAT`` (official registered name and config keys)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        c = cfg.MODEL.DINAT
        return {
            "in_chans": input_shape.channels,
            "embed_dim": c.EMBED_DIM,
            "depths": list(c.DEPTHS),
            "num_heads": list(c.NUM_HEADS),
            "kernel_size": c.KERNEL_SIZE,
            "dilations": [list(d) for d in c.DILATIONS] if c.DILATIONS is not None else None,
            "mlp_ratio": c.MLP_RATIO,
            "qkv_bias": c.QKV_BIAS,
            "qk_scale": c.QK_SCALE,
            "drop_rate": c.DROP_RATE,
            "attn_drop_rate": c.ATTN_DROP_RATE,
            "drop_path_rate": c.DROP_PATH_RATE,
            "layer_scale": c.LAYER_SCALE,
            "rpb": c.RPB,
            "attention_impl": c.ATTENTION_IMPL,
            "pad_small_inputs": c.PAD_SMALL_INPUTS,
            "out_features": list(c.OUT_FEATURES),
        }
