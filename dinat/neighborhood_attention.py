"""2-D (dilated) neighborhood attention with relative positional bias.

Semantics are those of NATTEN <= 0.17 (the library the official DiNAT checkpoints were trained with).
Along each spatial axis of length ``L``, with kernel size ``k`` (odd) and dilation ``d``:

* query ``i`` belongs to the dilation group ``g = i mod d``; the group holds the positions
  ``g, g + d, g + 2d, ...`` (``Lg`` of them);
* the query's window is the ``k`` consecutive *group* positions starting at
  ``clamp(i // d - k // 2, 0, Lg - k)``: windows are shifted (not padded) at the borders, so every
  query attends to exactly ``k * k`` keys;
* the relative positional bias ``rpb`` of shape ``[heads, 2k - 1, 2k - 1]`` is indexed by
  ``(key - query) / d + k - 1`` on each axis (this also holds for the shifted border windows, as in
  NATTEN's ``get_pb_start``).

NATTEN requires every axis to be at least ``k * d`` long (then every group has ``Lg >= k``); the
functions here raise a ``ValueError`` otherwise. :class:`NeighborhoodAttention2D` reproduces what
NATTEN 0.14's module did with smaller inputs: zero-pad the input at the bottom/right to ``k * d``
before the qkv projection and crop the output.

Tensors use NATTEN's "heads last" layout: ``[batch, height, width, heads, head_dim]``.

Implementations (all compute the same function, see ``tests/test_neighborhood_attention.py``):

* ``"reference"``: :func:`na2d_reference`, brute force over explicitly built neighbour indices;
  the ground truth of the tests. Memory ``O(H * W * k^2 * head_dim)``.
* ``"tiled"``: :func:`na2d_tiled`, pure PyTorch; splits the input into dense dilation groups, cuts
  each group into query tiles, attends every tile densely to the key region covering all windows
  of the tile (batched matrix products) with the window mask and the bias added from a small
  per-tile-type table, processing a bounded number of tile rows at a time. Runs on any device;
  the default on CPU.
* ``"flex"``: :func:`na2d_flex`, ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding
  the bias and a block mask for the window; compiled with ``torch.compile`` on CUDA. PyTorch's flex
  attention has no backward on CPU.
* ``"natten"``: :func:`na2d_natten`, NATTEN's fused ``natten.functional.na2d`` (NATTEN >= 0.20);
  no relative positional bias.
"""
import logging
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ATTENTION_IMPLS",
    "NeighborhoodAttention2D",
    "na2d",
    "na2d_flex",
    "na2d_natten",
    "na2d_reference",
    "na2d_tiled",
    "natten_fused_available",
    "resolve_attention_impl",
]

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "reference", "tiled", "flex", "natten")

# Upper bound on the number of attention logits the tiled path holds at once (per chunk of tile
# rows); 2**22 fp32 logits = 16 MiB, plus the softmax output of the same size.
_TILED_MAX_LOGITS = 1 << 22
# Default query-tile side of the tiled path (measured best on CPU for k = 7..13).
_TILED_MAX_TILE = 8


# ----------------------------------------------------------------------------- argument checks
def _check_inputs(query, key, value, rpb, kernel_size: int, dilation: int) -> None:
    if query.dim() != 5:
        raise ValueError(
            f"Expected query of shape [batch, height, width, heads, head_dim], got {tuple(query.shape)}."
        )
    if key.shape != query.shape or value.shape[:-1] != query.shape[:-1]:
        raise ValueError(
            f"query, key and value shapes do not match: {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}."
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}.")
    _, height, width, heads, _ = query.shape
    if height < kernel_size * dilation or width < kernel_size * dilation:
        raise ValueError(
            f"Neighborhood attention needs every spatial axis >= kernel_size * dilation = "
            f"{kernel_size * dilation}, got {height}x{width}. Pad the input first "
            "(NeighborhoodAttention2D does so when pad_small_inputs=True)."
        )
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(
            f"rpb must have shape {(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)}, "
            f"got {tuple(rpb.shape)}."
        )


def _default_scale(query, scale: Optional[float]) -> float:
    return query.shape[-1] ** -0.5 if scale is None else scale


# ----------------------------------------------------------------------------- reference
def _neighbors_1d(length: int, kernel_size: int, dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Explicit neighbour lists along one axis.

    Returns ``(keys, bias_index)``, both ``[length, kernel_size]`` int64: the key positions of every
    query's window, and the rpb index of each (query, key) pair.
    """
    keys, bias_index = [], []
    for i in range(length):
        group = i % dilation
        group_len = len(range(group, length, dilation))
        start = min(max(i // dilation - kernel_size // 2, 0), max(group_len - kernel_size, 0))
        window = [group + (start + j) * dilation for j in range(kernel_size)]
        keys.append(window)
        bias_index.append([(p - i) // dilation + kernel_size - 1 for p in window])
    return torch.tensor(keys), torch.tensor(bias_index)


def na2d_reference(query, key, value, rpb, kernel_size: int, dilation: int = 1, scale=None):
    """Brute-force neighborhood attention (the ground truth of the tests).

    Args:
        query, key, value: ``[B, H, W, heads, head_dim]``.
        rpb: ``[heads, 2k - 1, 2k - 1]`` relative positional bias, or None.
        kernel_size: odd window side ``k``.
        dilation: dilation ``d``; ``H`` and ``W`` must be >= ``k * d``.
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``[B, H, W, heads, head_dim_v]``.
    """
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    _, height, width, _, _ = query.shape
    device = query.device
    keys_h, bias_h = (t.to(device) for t in _neighbors_1d(height, kernel_size, dilation))
    keys_w, bias_w = (t.to(device) for t in _neighbors_1d(width, kernel_size, dilation))
    rows = keys_h[:, None, :, None]  # [H, 1, k, 1]
    cols = keys_w[None, :, None, :]  # [1, W, 1, k]
    k_nb = key[:, rows, cols]  # [B, H, W, k, k, heads, D]
    v_nb = value[:, rows, cols]
    logits = torch.einsum("bijnc,bijxync->bijnxy", query * _default_scale(query, scale), k_nb)
    if rpb is not None:
        bias = rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]  # [heads, H, W, k, k]
        logits = logits + bias.permute(1, 2, 0, 3, 4).to(logits.dtype)
    attn = logits.flatten(-2).softmax(dim=-1).view_as(logits)
    return torch.einsum("bijnxy,bijxync->bijnc", attn, v_nb)


# ----------------------------------------------------------------------------- tiled (any device)
class _AxisTiling(NamedTuple):
    """How one axis (length ``L``) of a dense, dilation-1 group is cut into query tiles.

    Tile ``t`` holds the queries ``first_query + t * tile + [0, tile)`` and attends to the keys
    ``first_key + t * tile + [0, region)``; both ranges may reach outside ``[0, L)`` (zero padding:
    padded queries are dropped, padded keys are masked). Every real query's window lies inside the
    key region of its tile, so the regions are a plain strided view (``Tensor.unfold``) of the
    padded keys.
    """

    tile: int
    num_tiles: int
    region: int
    first_query: int  # <= 0
    first_key: int  # <= 0
    patterns: torch.Tensor  # [num_patterns, tile, region] rpb index of each pair, -1 outside the window
    pattern_of_tile: torch.Tensor  # [num_tiles] index into patterns


def _tile_layout(length: int, kernel_size: int, max_tile: int) -> Tuple[int, int, int]:
    """``(tile, num_tiles, first_query)`` computing the fewest logits along an axis.

    With several tiles, tile ``t``'s key region starts ``k // 2`` before its first query and spans
    ``tile + k - 1`` keys. That covers the shifted border windows only if the first and the last
    tile hold at least ``k // 2 + 1`` real queries; ``first_query`` (padding before the axis)
    moves the tile boundaries to make that so. A single tile whose region is the whole axis always
    works.
    """
    half = kernel_size // 2
    best = (length * length, length, 1, 0)  # (logits, tile, num_tiles, first_query): one tile
    for tile in range(half + 1, max(max_tile, kernel_size) + 1):
        for first_query in range(0, half - tile, -1):  # first tile keeps >= half + 1 real queries
            num_tiles = math.ceil((length - first_query) / tile)
            last_real = length - (first_query + (num_tiles - 1) * tile)
            logits = num_tiles * tile * (tile + kernel_size - 1)
            if num_tiles > 1 and last_real >= half + 1 and logits < best[0]:
                best = (logits, tile, num_tiles, first_query)
                break
    return best[1:]


def _axis_tiling(length: int, kernel_size: int, max_tile: int, device) -> _AxisTiling:
    tile, num_tiles, first_query = _tile_layout(length, kernel_size, max_tile)
    if num_tiles == 1:
        region, first_key = length, 0
    else:
        region, first_key = tile + kernel_size - 1, first_query - kernel_size // 2
    tile_start = torch.arange(num_tiles, device=device)[:, None] * tile
    # Padded queries take the window of the nearest real query (keeps every softmax row finite).
    queries = (first_query + tile_start + torch.arange(tile, device=device)).clamp(0, length - 1)
    keys = first_key + tile_start + torch.arange(region, device=device)  # [num_tiles, region]
    starts = (queries - kernel_size // 2).clamp(0, length - kernel_size)
    offset = keys[:, None, :] - starts[:, :, None]  # position of the key inside the query's window
    in_window = (offset >= 0) & (offset < kernel_size)
    bias_index = keys[:, None, :] - queries[:, :, None] + kernel_size - 1
    code = torch.where(in_window, bias_index, torch.full_like(bias_index, -1))
    patterns, pattern_of_tile = torch.unique(code.flatten(1), dim=0, return_inverse=True)
    return _AxisTiling(
        tile=tile,
        num_tiles=num_tiles,
        region=region,
        first_query=first_query,
        first_key=first_key,
        patterns=patterns.view(-1, tile, region),
        pattern_of_tile=pattern_of_tile,
    )


def _bias_table(rows: _AxisTiling, cols: _AxisTiling, rpb, dtype) -> torch.Tensor:
    """Additive logits bias (rpb inside the window, -inf outside) for every pair of tile patterns.

    Returns ``[heads or 1, row_patterns, col_patterns, tile_h * tile_w, region_h * region_w]``.
    """
    code_h = rows.patterns[:, None, :, None, :, None]  # [Ph, 1, Th, 1, Rh, 1]
    code_w = cols.patterns[None, :, None, :, None, :]  # [1, Pw, 1, Tw, 1, Rw]
    outside = (code_h < 0) | (code_w < 0)  # [Ph, Pw, Th, Tw, Rh, Rw]
    if rpb is None:
        table = torch.zeros((1,) + outside.shape, dtype=dtype, device=outside.device)
    else:
        table = rpb.to(dtype)[:, code_h.clamp(min=0), code_w.clamp(min=0)]  # [heads, Ph, Pw, ...]
    return table.masked_fill(outside, float("-inf")).flatten(5, 6).flatten(3, 4)


def _pad_axes(x, first_h: int, first_w: int, size_h: int, size_w: int):
    """Zero-pad ``[N, heads, H, W, D]`` to ``[first, first + size)`` on the two spatial axes."""
    height, width = x.shape[2], x.shape[3]
    return F.pad(x, (0, 0, -first_w, size_w + first_w - width, -first_h, size_h + first_h - height))


def _na2d_dense_grid(query, key, value, rpb, kernel_size: int, max_tile: int, max_logits: int):
    """Dilation-1 neighborhood attention of ``[N, heads, H, W, D]`` tensors (query already scaled).

    Returns ``[N, heads, H, W, Dv]``.
    """
    n, heads, height, width, dim = query.shape
    dim_v = value.shape[-1]
    rows = _axis_tiling(height, kernel_size, max_tile, query.device)
    cols = _axis_tiling(width, kernel_size, max_tile, query.device)
    table = _bias_table(rows, cols, rpb, query.dtype)  # [heads|1, Ph, Pw, Th*Tw, Rh*Rw]

    def query_tiles(x):  # -> [N, heads, tiles_h, tiles_w, Th, Tw, D] (view)
        x = _pad_axes(x, rows.first_query, cols.first_query,
                      rows.num_tiles * rows.tile, cols.num_tiles * cols.tile)
        x = x.unflatten(3, (cols.num_tiles, cols.tile)).unflatten(2, (rows.num_tiles, rows.tile))
        return x.permute(0, 1, 2, 4, 3, 5, 6)

    def key_regions(x):  # -> [N, heads, tiles_h, tiles_w, Rh, Rw, D] (strided view)
        x = _pad_axes(x, rows.first_key, cols.first_key,
                      (rows.num_tiles - 1) * rows.tile + rows.region,
                      (cols.num_tiles - 1) * cols.tile + cols.region)
        x = x.unfold(2, rows.region, rows.tile).unfold(3, cols.region, cols.tile)
        return x.permute(0, 1, 2, 3, 5, 6, 4)

    q_tiles, k_regions, v_regions = query_tiles(query), key_regions(key), key_regions(value)
    n_chunks, head_chunks, row_chunks = _chunk_ranges(
        n, heads, rows.num_tiles, cols.num_tiles * rows.tile * cols.tile * rows.region * cols.region, max_logits
    )
    biases = {}  # chunks with the same heads and row patterns (all interior ones) share their bias
    out_n = []
    for n_ in n_chunks:
        out_h = []
        for h_ in head_chunks:
            out_r = []
            for r_ in row_chunks:
                row_patterns = rows.pattern_of_tile[r_]
                bias_key = (h_.start, h_.stop, tuple(row_patterns.tolist()))
                chunk_shape = (n_.stop - n_.start, h_.stop - h_.start, len(row_patterns), cols.num_tiles)
                if bias_key not in biases:
                    head_table = table if table.shape[0] == 1 else table[h_]
                    bias = head_table[:, row_patterns[:, None], cols.pattern_of_tile[None, :]]
                    biases[bias_key] = bias.expand(*chunk_shape[1:], -1, -1).reshape(1, -1, *bias.shape[-2:])
                # 4-D [samples, heads * tile rows * tile cols, tokens, D] tensors: the layout of
                # scaled_dot_product_attention's fused CPU kernel (the mask broadcasts over the
                # samples). With a mask that requires grad, PyTorch runs its math backend.
                q_t = q_tiles[n_, h_, r_].reshape(chunk_shape[0], -1, rows.tile * cols.tile, dim)
                k_t = k_regions[n_, h_, r_].reshape(chunk_shape[0], -1, rows.region * cols.region, dim)
                v_t = v_regions[n_, h_, r_].reshape(chunk_shape[0], -1, rows.region * cols.region, dim_v)
                out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=biases[bias_key], scale=1.0)
                out_r.append(out.view(*chunk_shape, -1, dim_v))  # [n, h, tr, tw, Th*Tw, Dv]
            out_h.append(_cat(out_r, dim=2))
        out_n.append(_cat(out_h, dim=1))
    out = _cat(out_n, dim=0).unflatten(4, (rows.tile, cols.tile))  # [N, heads, tiles_h, tiles_w, Th, Tw, Dv]
    out = out.permute(0, 1, 2, 4, 3, 5, 6).flatten(2, 3).flatten(3, 4)
    return out[:, :, -rows.first_query : height - rows.first_query, -cols.first_query : width - cols.first_query]


def _cat(tensors, dim: int):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _ranges(total: int, step: int):
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _chunk_ranges(n: int, heads: int, tile_rows: int, logits_per_tile_row: int, max_logits: int):
    """Split ``[N, heads, tile rows]`` into chunks of at most ``max_logits`` logits (at least one
    tile row of one head): whole samples if they fit, else heads of one sample, else tile rows."""
    per_head = tile_rows * logits_per_tile_row
    if heads * per_head <= max_logits:
        return _ranges(n, max_logits // (heads * per_head)), [slice(0, heads)], [slice(0, tile_rows)]
    if per_head <= max_logits:
        return _ranges(n, 1), _ranges(heads, max_logits // per_head), [slice(0, tile_rows)]
    return _ranges(n, 1), _ranges(heads, 1), _ranges(tile_rows, max(1, max_logits // logits_per_tile_row))


class _GroupClass(NamedTuple):
    groups: slice  # dilation groups of this class
    length: int  # their common length


def _group_classes(length: int, dilation: int):
    """Dilation groups along an axis fall into <= 2 classes of equal length."""
    full, rest = divmod(length, dilation)
    classes = [_GroupClass(slice(0, rest), full + 1), _GroupClass(slice(rest, dilation), full)]
    return [c for c in classes if c.groups.stop > c.groups.start]


def na2d_tiled(
    query,
    key,
    value,
    rpb,
    kernel_size: int,
    dilation: int = 1,
    scale=None,
    max_tile: int = _TILED_MAX_TILE,
    max_logits: int = _TILED_MAX_LOGITS,
):
    """Neighborhood attention in pure PyTorch with bounded memory (default path on CPU).

    Same arguments and result as :func:`na2d_reference`; ``max_tile`` is the largest query-tile
    side tried (sides up to ``kernel_size`` are always tried) and ``max_logits`` bounds the logits
    computed at once. Differentiable with autograd (the softmax of
    every chunk is kept for the backward pass).
    """
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    batch, height, width, heads, _ = query.shape
    query = query * _default_scale(query, scale)
    if dilation == 1:
        q, k, v = (x.permute(0, 3, 1, 2, 4) for x in (query, key, value))  # [B, heads, H, W, D]
        out = _na2d_dense_grid(q, k, v, rpb, kernel_size, max_tile, max_logits)
        return out.permute(0, 2, 3, 1, 4)

    pad_h, pad_w = -height % dilation, -width % dilation
    per_group_h, per_group_w = (height + pad_h) // dilation, (width + pad_w) // dilation

    def to_groups(x):  # [B, H, W, heads, D] -> [B, d, d, heads, H/d, W/d, D]
        x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        x = x.view(batch, per_group_h, dilation, per_group_w, dilation, heads, x.shape[-1])
        return x.permute(0, 2, 4, 5, 1, 3, 6)

    q_g, k_g, v_g = to_groups(query), to_groups(key), to_groups(value)
    out = q_g.new_zeros(q_g.shape[:-1] + (value.shape[-1],))
    for rows in _group_classes(height, dilation):
        for cols in _group_classes(width, dilation):
            sel = (
                slice(None), rows.groups, cols.groups, slice(None),
                slice(0, rows.length), slice(0, cols.length),
            )
            n_h, n_w = rows.groups.stop - rows.groups.start, cols.groups.stop - cols.groups.start

            def batch_groups(x):  # -> [B * n_h * n_w, heads, length_h, length_w, D]
                return x[sel].reshape(-1, heads, rows.length, cols.length, x.shape[-1])

            res = _na2d_dense_grid(
                batch_groups(q_g), batch_groups(k_g), batch_groups(v_g), rpb, kernel_size, max_tile,
                max_logits,
            )
            out[sel] = res.view(batch, n_h, n_w, heads, rows.length, cols.length, -1)
    out = out.permute(0, 4, 1, 5, 2, 3, 6).reshape(
        batch, per_group_h * dilation, per_group_w * dilation, heads, -1
    )
    return out[:, :height, :width]


# ----------------------------------------------------------------------------- flex attention
def _flex_mods(height: int, width: int, kernel_size: int, dilation: int, rpb):
    """``(score_mod, mask_mod)`` of flex attention over the row-major flattened ``H x W`` tokens.

    Both only use broadcasting tensor ops, so they can also be evaluated on dense index grids.
    """
    half = kernel_size // 2

    def window_start(pos, length):
        group_len = (length - pos % dilation + dilation - 1) // dilation
        return torch.minimum((pos // dilation - half).clamp(min=0), group_len - kernel_size)

    def in_window(q_pos, k_pos, length):
        start = window_start(q_pos, length)
        k_group_pos = k_pos // dilation
        return (
            (q_pos % dilation == k_pos % dilation)
            & (k_group_pos >= start)
            & (k_group_pos < start + kernel_size)
        )

    def mask_mod(b, h, q_idx, kv_idx):
        return in_window(q_idx // width, kv_idx // width, height) & in_window(
            q_idx % width, kv_idx % width, width
        )

    if rpb is None:
        return None, mask_mod

    def score_mod(score, b, h, q_idx, kv_idx):
        # Exact division inside the window; clamped so that masked pairs index inside the table.
        dy = ((kv_idx // width - q_idx // width) // dilation + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
        dx = ((kv_idx % width - q_idx % width) // dilation + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
        return score + rpb[h, dy, dx].to(score.dtype)

    return score_mod, mask_mod


_BLOCK_MASKS: Dict[tuple, object] = {}
_COMPILED_FLEX: Dict[str, Callable] = {}


def _block_mask(height: int, width: int, kernel_size: int, dilation: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    cache_key = (height, width, kernel_size, dilation, str(device))
    if cache_key not in _BLOCK_MASKS:
        _, mask_mod = _flex_mods(height, width, kernel_size, dilation, None)
        tokens = height * width
        _BLOCK_MASKS[cache_key] = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    return _BLOCK_MASKS[cache_key]


def _flex_attention_fn(compile: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "compiled" not in _COMPILED_FLEX:
        _COMPILED_FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["compiled"]


def na2d_flex(query, key, value, rpb, kernel_size: int, dilation: int = 1, scale=None, compile=None):
    """Neighborhood attention with ``torch.nn.attention.flex_attention``.

    Same arguments and result as :func:`na2d_reference`. ``compile``: run flex attention through
    ``torch.compile`` (default: on CUDA tensors only). Eager flex attention runs on CPU (slowly, as
    a dense masked product) for the forward pass only: PyTorch has no flex backward on CPU.
    """
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    batch, height, width, heads, _ = query.shape
    if compile is None:
        compile = query.device.type == "cuda"
    score_mod, _ = _flex_mods(height, width, kernel_size, dilation, rpb)
    block_mask = _block_mask(height, width, kernel_size, dilation, query.device)

    def tokens(x):  # [B, H, W, heads, D] -> [B, heads, H*W, D]
        return x.flatten(1, 2).transpose(1, 2)

    out = _flex_attention_fn(compile)(
        tokens(query),
        tokens(key),
        tokens(value),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=_default_scale(query, scale),
    )
    return out.transpose(1, 2).reshape(batch, height, width, heads, -1)


# ----------------------------------------------------------------------------- NATTEN
def natten_fused_available(device) -> bool:
    """True when NATTEN is installed with its compiled library and ``device`` is a CUDA device."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import natten
    except ImportError:
        return False
    return bool(getattr(natten, "HAS_LIBNATTEN", False))


def na2d_natten(query, key, value, rpb, kernel_size: int, dilation: int = 1, scale=None):
    """NATTEN's fused ``natten.functional.na2d`` (NATTEN >= 0.20); requires ``rpb=None``.

    NATTEN picks its own backend: a fused CUDA kernel when its library is built, else its flex
    attention backend (very slow on CPU).
    """
    if rpb is not None:
        raise ValueError("NATTEN >= 0.20 has no relative positional bias; use impl 'tiled' or 'flex'.")
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    try:
        from natten.functional import na2d as natten_na2d
    except ImportError as e:
        raise ImportError("The 'natten' attention implementation needs `pip install natten`.") from e
    return natten_na2d(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        kernel_size=kernel_size,
        dilation=dilation,
        scale=_default_scale(query, scale),
    )


# ----------------------------------------------------------------------------- dispatch
_IMPL_FNS = {
    "reference": na2d_reference,
    "tiled": na2d_tiled,
    "flex": na2d_flex,
    "natten": na2d_natten,
}
_LOGGED_CHOICES = set()


def resolve_attention_impl(impl: str, device, has_rpb: bool) -> str:
    """Concrete implementation for ``impl`` on ``device``; logs each new choice once.

    ``"auto"``: NATTEN's fused kernel when there is no rpb and NATTEN has its compiled library on
    this (CUDA) device; else flex attention on CUDA; else the tiled path.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown neighborhood attention implementation {impl!r}; one of {ATTENTION_IMPLS}.")
    device = torch.device(device)
    if impl == "auto":
        if not has_rpb and natten_fused_available(device):
            resolved = "natten"
        elif device.type == "cuda":
            resolved = "flex"
        else:
            resolved = "tiled"
    else:
        resolved = impl
    if resolved == "natten" and has_rpb:
        raise ValueError("ATTENTION_IMPL 'natten' requires the relative positional bias to be disabled.")
    choice = (impl, resolved, device.type, has_rpb)
    if choice not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(choice)
        logger.info(
            "Neighborhood attention: implementation %r (requested %r) on %s, rpb %s.",
            resolved, impl, device.type, "on" if has_rpb else "off",
        )
    return resolved


def na2d(query, key, value, rpb, kernel_size: int, dilation: int = 1, scale=None, impl: str = "auto"):
    """Neighborhood attention with the implementation chosen by :func:`resolve_attention_impl`."""
    resolved = resolve_attention_impl(impl, query.device, rpb is not None)
    return _IMPL_FNS[resolved](query, key, value, rpb, kernel_size, dilation, scale)


# ----------------------------------------------------------------------------- module
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
            raise ValueError("Attention dropout is not supported by the neighborhood attention paths.")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown neighborhood attention implementation {impl!r}; one of {ATTENTION_IMPLS}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.impl = impl
        self.pad_small_inputs = pad_small_inputs

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
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
                f"Input {height}x{width} is smaller than kernel_size * dilation = {self.window_size} "
                "and pad_small_inputs is False."
            )
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        qkv = self.qkv(x).view(batch, padded_h, padded_w, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=3)
        x = na2d(query, key, value, self.rpb, self.kernel_size, self.dilation, self.scale, self.impl)
        x = x.reshape(batch, padded_h, padded_w, channels)
        if pad_h or pad_w:
            x = x[:, :height, :width]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, impl={self.impl!r}"
        )
