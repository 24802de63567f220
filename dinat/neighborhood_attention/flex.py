"""Neighborhood attention with ``torch.nn.attention.flex_attention``: a ``score_mod`` adding the
bias and a block mask for the window; compiled with ``torch.compile`` on CUDA (no backward on
CPU)."""

import functools
from typing import Callable, Dict, Tuple

import torch

from .checks import check_inputs, default_scale


@functools.lru_cache(maxsize=64)
def _geometry_tensors(
    height: int, width: int, kernel_size: int, dilation: int, device: torch.device
) -> Tuple[torch.Tensor, ...]:
    """``(height, width, kernel_size, dilation)`` as 0-dim int64 tensors on ``device``, built once
    per geometry and device: creating them is a blocking host-to-device copy on CUDA, which every
    layer call would otherwise pay. Built outside inference mode, so that tensors first made
    during an inference-mode evaluation can still be used by autograd later."""
    with torch.inference_mode(False):
        return tuple(torch.tensor(v, device=device) for v in (height, width, kernel_size, dilation))


def _flex_mods(height: int, width: int, kernel_size: int, dilation: int, rpb, device):
    """``(score_mod, mask_mod)`` of flex attention over the row-major flattened ``H x W`` tokens.

    The geometry is captured as tensors, not Python numbers, so that ``torch.compile`` does not
    specialise (and recompile) on every feature-map size and dilation of the network. Both mods
    only use broadcasting tensor ops, so they can also be evaluated on dense index grids.
    """
    geometry = (height, width, kernel_size, dilation)
    height, width, kernel, dilation = _geometry_tensors(*geometry, torch.device(device))
    half = kernel // 2

    def window_start(pos, length):
        group_len = (length - pos % dilation + dilation - 1) // dilation
        return torch.minimum((pos // dilation - half).clamp(min=0), group_len - kernel)

    def in_window(q_pos, k_pos, length):
        start = window_start(q_pos, length)
        k_group_pos = k_pos // dilation
        same_group = q_pos % dilation == k_pos % dilation
        return same_group & (k_group_pos >= start) & (k_group_pos < start + kernel)

    def mask_mod(b, h, q_idx, kv_idx):
        in_rows = in_window(q_idx // width, kv_idx // width, height)
        return in_rows & in_window(q_idx % width, kv_idx % width, width)

    if rpb is None:
        return None, mask_mod

    def score_mod(score, b, h, q_idx, kv_idx):
        # Exact division inside the window; clamped so that masked pairs index inside the table.
        dy = (kv_idx // width - q_idx // width) // dilation + kernel - 1
        dx = (kv_idx % width - q_idx % width) // dilation + kernel - 1
        last = 2 * kernel_size - 2
        return score + rpb[h, dy.clamp(0, last), dx.clamp(0, last)].to(score.dtype)

    return score_mod, mask_mod


_COMPILED: Dict[str, Callable] = {}
# Configurations the compiled flex attention has been called with (see :func:`flex_variant`).
_COMPILED_VARIANTS: set = set()
# Recompilations left for configurations a model has not used yet.
_RECOMPILE_HEADROOM = 8


def _compiled(name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)``, built once per name."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def flex_variant(query, rpb, kernel_size: int, dilation: int) -> tuple:
    """What makes the compiled flex attention specialise: a new value means a new compilation.

    The map size and dilation reach the kernels as tensors (see :func:`_flex_mods`), but the
    token count, heads, head dimension, dtype, whether gradients flow and whether there is a
    bias are baked into each compiled variant.
    """
    batch, height, width, heads, head_dim = query.shape
    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad or (rpb is not None and rpb.requires_grad)
    )
    return (
        batch,
        height * width,
        heads,
        head_dim,
        query.dtype,
        needs_grad,
        rpb is not None,
        kernel_size,
        str(query.device),
    )


def compiled_variants() -> int:
    """Number of configurations the compiled flex attention has been called with so far."""
    return len(_COMPILED_VARIANTS)


def _reserve_compilation(variant: tuple) -> None:
    """Keep ``torch.compile``'s per-function recompile limit above the number of variants.

    All DiNAT layers share one compiled flex attention; a network uses many variants (head counts
    per level, training and evaluation, the padded stage), and past the limit (8 by default)
    Dynamo silently runs the uncompiled flex attention, which materialises the whole score
    matrix (about 13.5 GB per image at DiNAT-L's dilated first level).
    """
    if variant in _COMPILED_VARIANTS:
        return
    _COMPILED_VARIANTS.add(variant)
    config = torch._dynamo.config
    needed = len(_COMPILED_VARIANTS) + _RECOMPILE_HEADROOM
    if config.recompile_limit < needed:
        config.recompile_limit = needed
    if config.accumulated_recompile_limit < needed:
        config.accumulated_recompile_limit = needed


@functools.lru_cache(maxsize=64)
def _block_mask(
    height: int, width: int, kernel_size: int, dilation: int, device: torch.device, compile: bool
):
    """Flex attention block mask of the neighborhoods (cached per geometry and device; built
    outside inference mode, as :func:`_geometry_tensors`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _, mask_mod = _flex_mods(height, width, kernel_size, dilation, None, device)
    tokens = height * width
    # Compiled mask creation works block by block instead of on the dense tokens x tokens grid.
    build = _compiled("create_block_mask", create_block_mask) if compile else create_block_mask
    with torch.inference_mode(False):
        return build(mask_mod, None, None, tokens, tokens, device=device)


def _flex_attention_fn(compile: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled("flex_attention", flex_attention) if compile else flex_attention


def na2d_flex(query, key, value, rpb, kernel_size, dilation=1, scale=None, compile=None):
    """Neighborhood attention with ``torch.nn.attention.flex_attention``.

    Same arguments and result as :func:`na2d_reference`. ``compile``: run flex attention (and the
    block-mask creation) through ``torch.compile`` (default: on CUDA tensors only). Eager flex
    attention runs on CPU (slowly, as a dense masked product) for the forward pass only: PyTorch
    has no flex backward on CPU.
    """
    check_inputs(query, key, value, rpb, kernel_size, dilation)
    batch, height, width, heads, _ = query.shape
    if compile is None:
        compile = query.device.type == "cuda"
    if compile:
        _reserve_compilation(flex_variant(query, rpb, kernel_size, dilation))
    score_mod, _ = _flex_mods(height, width, kernel_size, dilation, rpb, query.device)
    block_mask = _block_mask(height, width, kernel_size, dilation, query.device, bool(compile))

    def tokens(x):  # [B, H, W, heads, D] -> [B, heads, H*W, D]
        return x.flatten(1, 2).transpose(1, 2)

    out = _flex_attention_fn(compile)(
        tokens(query),
        tokens(key),
        tokens(value),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=default_scale(query, scale),
    )
    return out.transpose(1, 2).reshape(batch, height, width, heads, -1)
