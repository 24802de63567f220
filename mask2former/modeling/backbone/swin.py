"""Swin Transformer backbone (Liu et al. 2021) with the official module layout.

Parameter and buffer names follow the official segmentation code (and therefore the Mask2Former
checkpoints and the D2-converted ImageNet checkpoints): ``patch_embed.proj``, ``patch_embed.norm``,
``absolute_pos_embed``, ``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, attn.relative_position_index, norm2, mlp.fc1, mlp.fc2}``,
``layers.{i}.downsample.{reduction, norm}`` and one output norm ``norm{i}`` per output stage.

The backbone is meant to be extended (e.g. SeMask adds a semantic layer to each stage): stages are
built by the ``stage_factory`` given to :class:`SwinTransformer` (default :func:`swin_stage`) and
return a :class:`StageOutput`, whose ``maps`` (extra per-token maps of the stage, e.g. SeMask's
class logits) appear in the backbone output next to the stage's features; a stage splits into
:meth:`SwinStage.forward_blocks` and :meth:`SwinStage.forward_downsample`. Layers with their own
official initialisation opt out of the Swin one (:func:`init_swin_weights`).

Same numbers as the official code, computed with fewer copies. On CPU (float32 / float64, and
bf16 inference) the window attention runs in compiled kernels (:mod:`.window_attention_cpu`) that
read the q, k, v of the tokens in map order through the window layout's index: padding, cyclic
shift and window partition are never materialised, and the qkv and output projections skip the
padding tokens (whose q, k, v are the qkv bias). Elsewhere (GPUs, other autocast uses, no C++
compiler, ``attention_impl`` "partition") padding, cyclic shift and window partition (and their
inverses) are one gather each (:class:`WindowLayout`, built once per stage), and without
gradients the attention runs in ``scaled_dot_product_attention`` with the relative position bias
and the shift mask folded into one additive mask.
"""

import functools
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from torch import nn

from ...kernels import cpu_or_fallback
from ..layers import DropPath, Mlp, in_weight_dtype
from .window_attention_cpu import window_attention_cpu

__all__ = [
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_attention_mask",
    "WindowLayout",
    "window_layout",
    "WindowAttention",
    "SwinTransformerBlock",
    "PatchMerging",
    "SwinStage",
    "PatchEmbed",
    "SwinTransformer",
    "D2SwinTransformer",
]

# Additive attention-mask value between tokens of different regions in a shifted window (the
# official value; exp(-100) is ~4e-44, so these keys get no weight).
_MASKED = -100.0

# Window attention implementations (MODEL.SWIN.ATTENTION_IMPL): "auto" runs the compiled CPU
# kernels where they apply (WindowAttention.uses_cpu_kernel), "partition" always the window
# partition path (both give the same numbers; the export uses "partition").
WINDOW_ATTENTION_IMPLS = ("auto", "partition")


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * nW, window_size**2, C], windows in
    row-major order, tokens row-major inside a window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window_size**2, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window_size: Tuple[int, int]) -> torch.Tensor:
    """[Wh*Ww, Wh*Ww] index into the (2Wh-1)(2Ww-1) bias table for each (query, key) pair of a
    window: ``(dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1)`` with (dy, dx) = query - key."""
    wh, ww = window_size
    coords = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack(coords).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return (relative[0] + wh - 1) * (2 * ww - 1) + (relative[1] + ww - 1)


def shifted_window_attention_mask(
    padded_h: int, padded_w: int, window_size: int, shift_size: int, device: torch.device
) -> torch.Tensor:
    """Additive mask [nW, N, N] of the shifted windows (0 within a region, -100 across).

    After the cyclic shift by ``-shift_size`` the last window row/column holds tokens from two
    regions of the (padded) map that are not neighbours; tokens only attend within their region.
    """
    regions = torch.zeros((1, padded_h, padded_w, 1), device=device)
    slices = (
        slice(0, -window_size),
        slice(-window_size, -shift_size),
        slice(-shift_size, None),
    )
    label = 0
    for h in slices:
        for w in slices:
            regions[:, h, w, :] = label
            label += 1
    windows = window_partition(regions, window_size).squeeze(-1)  # nW, N
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill_(different, _MASKED)


class WindowLayout:
    """Where every token of an H x W map goes in the (shifted) windows, and back.

    The official block pads the normalised map with zeros to multiples of the window, rolls it by
    ``-shift_size``, partitions it into windows and undoes the three steps afterwards (six
    copies). The same is done here with one gather each way:

    * ``partition_index`` [nW * N]: for every window slot (windows row-major, tokens row-major),
      the source token in ``cat([tokens, zero_row])``, index ``H * W`` for padding;
    * ``reverse_index`` [H * W]: for every token, its window slot;
    * ``attn_mask``: :func:`shifted_window_attention_mask` if ``shift_size > 0``, else None.

    Building a layout launches device work but never waits for it (no host read-back);
    :func:`window_layout` returns the same layout again for the same map, window and device.
    """

    def __init__(self, h: int, w: int, window_size: int, shift_size: int, device: torch.device):
        self.h, self.w = h, w
        self.window_size, self.shift_size = window_size, shift_size
        hp, wp = -(-h // window_size) * window_size, -(-w // window_size) * window_size
        rows = torch.arange(hp, device=device).view(hp, 1)
        cols = torch.arange(wp, device=device).view(1, wp)
        token = rows * w + cols
        source = torch.where((rows < h) & (cols < w), token, torch.full_like(token, h * w))
        if shift_size > 0:
            source = torch.roll(source, shifts=(-shift_size, -shift_size), dims=(0, 1))
        self.partition_index = window_partition(source.view(1, hp, wp, 1), window_size).reshape(-1)
        slots = torch.arange(self.partition_index.numel(), device=device)
        # every real token has exactly one slot; the padding slots all write to the extra entry
        # h * w, which is dropped (a scatter: no boolean indexing, which waits for the device)
        reverse = torch.empty(h * w + 1, dtype=torch.long, device=device)
        self.reverse_index = reverse.scatter_(0, self.partition_index, slots)[: h * w]
        self.attn_mask = None
        if shift_size > 0:
            self.attn_mask = shifted_window_attention_mask(hp, wp, window_size, shift_size, device)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H*W, C] -> [B * nW, N, C] (zero padding, cyclic shift, window partition)."""
        b, _, c = x.shape
        x = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)
        return x.index_select(1, self.partition_index).view(-1, self.window_size**2, c)

    def reverse(self, windows: torch.Tensor) -> torch.Tensor:
        """[B * nW, N, C] -> [B, H*W, C] (inverse of :meth:`partition`, padding dropped)."""
        c = windows.shape[-1]
        num_slots = self.partition_index.numel()
        return windows.reshape(-1, num_slots, c).index_select(1, self.reverse_index)


@functools.lru_cache(maxsize=32)
def window_layout(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device
) -> WindowLayout:
    """The :class:`WindowLayout` of an H x W map, built once per (map size, window, shift,
    device) and returned again afterwards (its tensors must not be modified). Built outside
    inference mode: the indices are saved for backward by training steps, which tensors made
    during an inference-mode evaluation could not be."""
    with torch.inference_mode(False):
        return WindowLayout(h, w, window_size, shift_size, device)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias.

    Args:
        dim: channels.
        window_size: (Wh, Ww).
        num_heads: attention heads.
        qkv_bias: learnable bias of the q, k, v projection.
        qk_scale: attention scale override (default head_dim ** -0.5).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout on the output.
        impl: one of :data:`WINDOW_ATTENTION_IMPLS` (for :meth:`forward_map`).
    """

    def __init__(
        self,
        dim: int,
        window_size: Tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in WINDOW_ATTENTION_IMPLS:
            raise ValueError(
                f"window attention impl must be one of {WINDOW_ATTENTION_IMPLS}, got {impl!r}"
            )
        self.impl = impl
        self.dim = dim
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5

        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        # a persistent buffer, as in the official code (present in the official checkpoints)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """[num_heads, N, N] bias of every (query, key) pair of a window."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def _explicit_attention(self, q, k, v, bias):
        """softmax(q k^T * scale + bias) v, bias [nW or 1, nH, N, N] -> [B*nW, N, nH, hd]."""
        b_, heads, n, _ = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = (attn.view(-1, bias.shape[0], heads, n, n) + bias).view(b_, heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return (attn @ v).transpose(1, 2)

    def _fused_attention(self, q, k, v, bias):
        """Same as :meth:`_explicit_attention` with ``scaled_dot_product_attention``: one call
        per image when the bias differs per window (cheaper than copying it for every image)."""
        dropout = self.attn_drop.p if self.training else 0.0
        num_windows = bias.shape[0]
        if num_windows == 1:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale
            ).transpose(1, 2)
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[i : i + num_windows],
                    k[i : i + num_windows],
                    v[i : i + num_windows],
                    attn_mask=bias,
                    dropout_p=dropout,
                    scale=self.scale,
                ).transpose(1, 2)
                for i in range(0, q.shape[0], num_windows)
            ]
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: [B * nW, N, C] tokens of the windows (window-major, the nW windows of an image
                consecutive).
            mask: optional additive mask [nW, N, N] (0 / -100) of the shifted windows.

        Returns:
            [B * nW, N, C].
        """
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, nH, N, hd]
        bias = self.relative_position_bias().unsqueeze(0).to(q.dtype)  # [1, nH, N, N]
        if mask is not None:
            bias = bias + mask.unsqueeze(1).to(q.dtype)  # [nW, nH, N, N]
        # The fused kernel is 2-4x faster without gradients; with gradients w.r.t. the bias it
        # falls back to PyTorch's generic path, slower than the explicit one.
        if torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad):
            x = self._explicit_attention(q, k, v, bias)
        else:
            x = self._fused_attention(q, k, v, bias)
        x = x.reshape(b_, n, c)  # from [B*nW, N, nH, hd]
        return self.proj_drop(self.proj(x))

    def uses_cpu_kernel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_map` runs the compiled CPU kernels for ``x``: with impl "auto",
        a float32 / float64 CPU tensor outside autocast, or inside a bfloat16 autocast without
        gradients (bf16 inference); no attention dropout in training; and the kernels built here
        (else a warning, once, says why not)."""
        if self.impl != "auto":
            return False
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return False
        if torch.is_autocast_enabled("cpu"):
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
            if not bf16 or (torch.is_grad_enabled() and self.qkv.weight.requires_grad):
                return False
        return (
            not (self.training and self.attn_drop.p > 0)
            and cpu_or_fallback("Swin window attention on CPU", "window partition") == "cpu"
        )

    def forward_map(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """
        The attention of every token of a map within its (shifted) window:
        ``layout.reverse(self(layout.partition(x), layout.attn_mask))``.

        Args:
            x: [B, H*W, C] tokens in map order (the normalised map).
            layout: the map's :class:`WindowLayout` for this attention's window and shift.

        Returns:
            [B, H*W, C].
        """
        if not self.uses_cpu_kernel(x):
            return layout.reverse(self(layout.partition(x), mask=layout.attn_mask))
        b, length, c = x.shape
        head_dim = c // self.num_heads
        # the projections of the real tokens only: a padding token (zeros) projects to the bias
        # (in the projection's output dtype: bfloat16 under autocast, as bias and mask then are)
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, head_dim)
        pad = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * c)
        mask = None if layout.attn_mask is None else layout.attn_mask.to(qkv.dtype)
        out = window_attention_cpu(
            qkv,
            pad.to(qkv.dtype).view(3, self.num_heads, head_dim),
            layout.partition_index,
            self.relative_position_bias().to(qkv.dtype),
            mask,
            self.scale,
        )
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """Swin block: (shifted) window attention + MLP, pre-norm residuals.

    Feature maps whose size is not a multiple of the window are zero-padded (after ``norm1``)
    at the bottom / right before the window partition; padded tokens take part as keys as in the
    official code. The stage passes the :class:`WindowLayout` of the map (padding, shift,
    partition indices and shift mask) to its blocks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        attention_impl: str = "auto",
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(
                f"shift_size must be in [0, window_size), got {shift_size} and {window_size}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(
            dim,
            window_size=(window_size, window_size),
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            impl=attention_impl,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """
        Args:
            x: [B, H*W, C].
            layout: the :class:`WindowLayout` of the map for this block's window and shift.
        """
        b, length, c = x.shape
        if length != layout.h * layout.w:
            raise ValueError(f"input has {length} tokens, expected {layout.h} x {layout.w}")
        if (layout.window_size, layout.shift_size) != (self.window_size, self.shift_size):
            raise ValueError("window layout does not match the block's window / shift size")
        x = x + self.drop_path(self.attn.forward_map(self.norm1(x), layout))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 patch merging: concatenate each 2x2 neighbourhood (odd sizes zero-padded), LayerNorm,
    linear 4C -> 2C (``norm``, ``reduction``)."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, H*W, C] -> [B, ceil(H/2) * ceil(W/2), 2C]."""
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # official channel order: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column) offsets
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


# Initialisations of the Linear layers (``SwinTransformer(init=...)``, ``MODEL.SWIN.INIT``).
SWIN_INITS = ("official", "trunc_normal")


def init_swin_weights(module: nn.Module):
    """The Swin classifier's ``init_weights`` for the Linear and LayerNorm layers under
    ``module`` (truncated normal std 0.02, zero biases), in module order. The official
    Mask2Former ``D2SwinTransformer`` never calls it (``init="official"`` keeps PyTorch's default
    init); ``init="trunc_normal"`` applies it.

    Modules whose class sets ``keeps_own_init = True`` (an extension's layers with their own
    official initialisation, e.g. SeMask's semantic attention) are left as they are, with
    everything below them.
    """
    if getattr(module, "keeps_own_init", False):
        return
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)
    for child in module.children():
        init_swin_weights(child)


class StageOutput(NamedTuple):
    """What a stage returns: its output tokens [B, h*w, C] (normalised into the feature map of
    the stage), the next stage's input and size, and extra per-token maps [B, h*w, K] by name
    (returned by the backbone as ``"<name>_res<i+2>"`` maps [B, K, h, w])."""

    out: torch.Tensor
    next: torch.Tensor
    next_h: int
    next_w: int
    maps: Dict[str, torch.Tensor] = {}


class SwinStage(nn.Module):
    """One Swin stage ("BasicLayer" in the official code): ``depth`` blocks alternating regular
    and shifted windows, then an optional :class:`PatchMerging` (``downsample``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, Sequence[float]] = 0.0,
        norm_layer=nn.LayerNorm,
        downsample: bool = False,
        use_checkpoint: bool = False,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        if isinstance(drop_path, (list, tuple)):
            drop_paths = list(drop_path)
        else:
            drop_paths = [drop_path] * depth
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim=dim,
                    num_heads=num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_paths[i],
                    norm_layer=norm_layer,
                    attention_impl=attention_impl,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim=dim, norm_layer=norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Run the blocks on [B, H*W, C] tokens."""
        for blk in self.blocks:
            layout = window_layout(int(h), int(w), self.window_size, blk.shift_size, x.device)
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint.checkpoint(blk, x, layout, use_reentrant=False)
            else:
                x = blk(x, layout)
        return x

    def forward_downsample(self, x: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, int, int]:
        """Patch merging of the stage output (identity for the last stage)."""
        if self.downsample is None:
            return x, h, w
        return self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2

    def forward(self, x: torch.Tensor, h: int, w: int) -> StageOutput:
        """Stage output [B, H*W, C], next-stage input, its H, its W."""
        x = self.forward_blocks(x, h, w)
        x_down, hd, wd = self.forward_downsample(x, h, w)
        return StageOutput(x, x_down, hd, wd)


def swin_stage(index: int, **stage_kwargs) -> SwinStage:
    """The default stage factory of :class:`SwinTransformer`: a plain :class:`SwinStage`."""
    return SwinStage(**stage_kwargs)


class PatchEmbed(nn.Module):
    """Patch embedding: strided conv ``proj`` (input zero-padded to a multiple of the patch) and
    optional LayerNorm ``norm``.

    ``proj`` runs in the weights' dtype even under autocast: bfloat16's 8 significant bits would
    round the normalised image by up to about one intensity level before anything else sees it
    (measured on CamVid val with a trained model, keeping this one convolution in float32 takes
    bf16 inference from 99.69 % to 99.81 % argmax agreement with fp32), and the convolution is
    a negligible share of the network's arithmetic.
    """

    def __init__(
        self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm_layer=None
    ):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, embed_dim, ceil(H/p), ceil(W/p)]."""
        _, _, h, w = x.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            x = F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        x = in_weight_dtype(self.proj, x)
        if self.norm is not None:
            wh, ww = x.shape[2:]
            x = self.norm(x.flatten(2).transpose(1, 2))
            x = x.transpose(1, 2).reshape(-1, self.embed_dim, wh, ww)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer backbone returning the normalised outputs of the selected stages.

    Args:
        pretrain_img_size: image size of the pretraining (size of the absolute position
            embedding, if ``ape``).
        patch_size: patch size of the embedding.
        in_chans: input channels.
        embed_dim: channels of the first stage (stage i has embed_dim * 2**i).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias, qk_scale: see :class:`WindowAttention`.
        drop_rate: dropout after the embedding, in the MLPs and attention outputs.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, increasing linearly from 0 over all blocks.
        norm_layer: normalisation layer class.
        ape: learned absolute position embedding (interpolated bicubically to the input).
        patch_norm: LayerNorm after the patch embedding.
        out_indices: stages whose outputs are returned (each gets an output norm ``norm{i}``);
            None: all.
        frozen_stages: -1 none; 0 freezes the patch embedding; 1 also the absolute position
            embedding; k >= 2 also stages 0 .. k-2 (official semantics). Frozen parts have
            ``requires_grad=False`` and stay in eval mode.
        use_checkpoint: activation checkpointing of every block (less memory, more time).
        stage_factory: ``stage_factory(index, **stage_kwargs)`` builds stage ``index`` from the
            :class:`SwinStage` arguments; the stage is called as ``stage(x, h, w)`` and returns
            a :class:`StageOutput`.
        init: "official" (the official Mask2Former backbone: Linear layers keep PyTorch's
            default init) or "trunc_normal" (:func:`init_swin_weights`). The relative position
            tables (and ``absolute_pos_embed``) are truncated normal std 0.02 in both.
        attention_impl: window attention implementation, one of :data:`WINDOW_ATTENTION_IMPLS`.
    """

    def __init__(
        self,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer=nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        out_indices: Optional[Sequence[int]] = None,
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
        stage_factory: Callable[..., nn.Module] = swin_stage,
        init: str = "official",
        attention_impl: str = "auto",
    ):
        super().__init__()
        if init not in SWIN_INITS:
            raise ValueError(f"Swin init must be one of {SWIN_INITS}, got {init!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.pretrain_img_size = pretrain_img_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        if out_indices is None:
            out_indices = range(self.num_layers)
        self.out_indices = tuple(sorted(out_indices))
        if not self.out_indices or not all(0 <= i < self.num_layers for i in self.out_indices):
            raise ValueError(
                f"out_indices must be a non-empty subset of 0..{self.num_layers - 1}, "
                f"got {self.out_indices}"
            )
        self.frozen_stages = frozen_stages
        self.num_features = [int(embed_dim * 2**i) for i in range(self.num_layers)]

        self.patch_embed = PatchEmbed(
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None,
        )
        if ape:
            resolution = (pretrain_img_size // patch_size, pretrain_img_size // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *resolution))
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth rate of every block, increasing linearly
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        # Only the stages up to the last returned one are built (and that one without its patch
        # merging): parameters that never receive a gradient would make DistributedDataParallel
        # fail. With every stage returned (all configs) this is the official layout.
        built = max(self.out_indices) + 1
        self.layers = nn.ModuleList()
        for i in range(built):
            self.layers.append(
                stage_factory(
                    i,
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    downsample=i < built - 1,
                    use_checkpoint=use_checkpoint,
                    attention_impl=attention_impl,
                )
            )
        for i in self.out_indices:
            self.add_module(f"norm{i}", norm_layer(self.num_features[i]))

        if init == "trunc_normal":
            init_swin_weights(self)
        if ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self._freeze_stages()

    def _freeze_stages(self):
        frozen = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        if self.frozen_stages >= 2:
            frozen.append(self.pos_drop)
            frozen.extend(self.layers[: self.frozen_stages - 1])
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad = False

    def train(self, mode: bool = True):
        """Switch train/eval mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def forward_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Image [B, C, H, W] -> tokens [B, h*w, embed_dim], h, w."""
        x = self.patch_embed(x)
        h, w = x.shape[2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = x.flatten(2).transpose(1, 2)
        return self.pos_drop(x), h, w

    def forward_output(self, index: int, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Normalise the tokens of stage ``index`` and reshape to a [B, C, h, w] map."""
        x = getattr(self, f"norm{index}")(x)
        return x.view(-1, h, w, self.num_features[index]).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, K] tokens -> [B, K, h, w] map."""
        return x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Image [B, C, H, W] -> {"res{i+2}": [B, embed_dim * 2**i, ceil(H / 2**(i+2)), ...]}
        for the stages in ``out_indices`` (later stages are not run)."""
        x, h, w = self.forward_embed(x)
        outs = {}
        for i in range(max(self.out_indices) + 1):
            stage = self.layers[i](x, h, w)
            if i in self.out_indices:
                name = f"res{i + 2}"
                outs[name] = self.forward_output(i, stage.out, h, w)
                for key, tokens in stage.maps.items():
                    outs[f"{key}_{name}"] = self.tokens_to_map(tokens, h, w)
            x, h, w = stage.next, stage.next_h, stage.next_w
        return outs


_STAGE_NAMES = ("res2", "res3", "res4", "res5")


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, Backbone):
    """Detectron2 wrapper of :class:`SwinTransformer`: features "res2".."res5" at strides 4, 8,
    16, 32 with embed_dim * 2**i channels, built from ``cfg.MODEL.SWIN``."""

    @configurable
    def __init__(self, *, out_features: Sequence[str] = _STAGE_NAMES, **kwargs):
        """
        Args:
            out_features: subset of "res2".."res5" to return.
            kwargs: arguments of :class:`SwinTransformer` (except ``out_indices``).
        """
        unknown = [name for name in out_features if name not in _STAGE_NAMES]
        if unknown:
            raise ValueError(f"Unknown Swin output features {unknown}; choose from {_STAGE_NAMES}")
        super().__init__(out_indices=[_STAGE_NAMES.index(name) for name in out_features], **kwargs)
        self._out_features = list(out_features)
        self._out_feature_strides = {name: 2 ** (i + 2) for i, name in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = {
            name: self.num_features[i] for i, name in enumerate(_STAGE_NAMES)
        }

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        swin = cfg.MODEL.SWIN
        return {
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": input_shape.channels if input_shape is not None else 3,
            "embed_dim": swin.EMBED_DIM,
            "depths": swin.DEPTHS,
            "num_heads": swin.NUM_HEADS,
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "frozen_stages": swin.FROZEN_STAGES,
            "use_checkpoint": swin.USE_CHECKPOINT,
            "out_features": swin.OUT_FEATURES,
            "init": swin.INIT,
            "attention_impl": swin.ATTENTION_IMPL,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: [N, C, H, W]; any size works (maps are padded internally), multiples of
                :attr:`size_divisibility` give the nominal strides exactly.
        """
        if x.dim() != 4:
            raise ValueError(
                f"SwinTransformer takes an input of shape (N, C, H, W), got {tuple(x.shape)}"
            )
        return super().forward(x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32
