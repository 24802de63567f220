"""The ``NeighborhoodAttention2D`` layer: qkv projection, small-input padding, attention through
:func:`~.dispatch.na2d`, output projection."""

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .dispatch import check_impl_name, na2d


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D neighborhood attention layer on ``[B, H, W, C]`` inputs.

    Parameter names (``qkv``, ``rpb``, ``proj``) and behaviour match NATTEN 0.14's
    ``NeighborhoodAttention2D``, which the official DiNAT checkpoints use.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (``C`` must be divisible by it).
        kernel_size: odd window side ``k``.
        dilation: dilation ``d``.
        bias: learn the relative positional bias ``rpb`` ``[heads, 2k - 1, 2k - 1]``.
        qkv_bias: bias of the qkv projection.
        qk_scale: logit scale, default ``head_dim ** -0.5``.
        attn_drop: attention dropout; must be 0 (no implementation here supports it).
        proj_drop: dropout after the output projection.
        impl: one of :data:`ATTENTION_IMPLS`.
        pad_small_inputs: if an axis is shorter than ``k * d``, zero-pad the input at the
            bottom/right up to ``k * d`` before the qkv projection and crop the output (NATTEN
            0.14's behaviour); if False such inputs raise a ``ValueError``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int = 1,
        bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
        pad_small_inputs: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        if attn_drop:
            raise ValueError("Attention dropout is not supported by neighborhood attention here.")
        check_impl_name(impl)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.impl = impl
        self.pad_small_inputs = pad_small_inputs

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if bias:
            rpb_size = 2 * kernel_size - 1
            self.rpb = nn.Parameter(torch.zeros(num_heads, rpb_size, rpb_size))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        batch, height, width, channels = x.shape
        pad_h = max(0, self.window_size - height)
        pad_w = max(0, self.window_size - width)
        if (pad_h or pad_w) and not self.pad_small_inputs:
            raise ValueError(
                f"Input {height}x{width} is smaller than kernel_size * dilation = "
                f"{self.window_size} and pad_small_inputs is False."
            )
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        qkv = self.qkv(x).view(batch, padded_h, padded_w, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=3)
        x = na2d(
            query, key, value, self.rpb, self.kernel_size, self.dilation, self.scale, self.impl
        )
        x = x.reshape(batch, padded_h, padded_w, channels)
        if pad_h or pad_w:
            x = x[:, :height, :width]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
            f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"rel_pos_bias={self.rpb is not None}, impl={self.impl!r}"
        )
