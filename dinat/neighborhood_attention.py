"""2-D (dilated) neighborhood attention with relative positional bias.

Semantics are those of NATTEN <= 0.17 (the library the official DiNAT checkpoints were trained
with). Along each spatial axis of length ``L``, with kernel size ``k`` (odd) and dilation ``d``:

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
* ``"tiled"``: :func:`na2d_tiled`, pure PyTorch; splits the input into dense dilation groups,
  cuts each group into square query tiles and attends every tile to the key region covering the
  windows of all its queries (a strided view of the keys), masking keys outside each query's window
  and adding the rpb through an attention mask. Tiles with the same window pattern share one mask,
  so each piece is one call of ``scaled_dot_product_attention`` (PyTorch's fused kernel in
  inference; its math backend when the rpb requires grad), in chunks of bounded size. Runs on any
  device; the default on CPU.
* ``"flex"``: :func:`na2d_flex`, ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding
  the bias and a block mask for the window; compiled with ``torch.compile`` on CUDA. PyTorch's flex
  attention has no backward on CPU.
* ``"natten"``: :func:`na2d_natten`, NATTEN's fused ``natten.functional.na2d`` (NATTEN >= 0.20);
  no relative positional bias.
"""
import functools
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

# About how many attention logits one call of the tiled path covers (a chunk of tiles): PyTorch's
# fused attention never holds them all, its math backend (training with rpb) does, plus the
# softmax: 2**22 fp32 logits = 16 MiB each.
_TILED_MAX_LOGITS = 1 << 22
# Largest query-tile side the tiled path tries beyond the kernel size; per axis it takes the tiling
# with the fewest logits (128 tokens, k = 11: tiles of 8, key regions of 18).
_TILED_MAX_TILE = 8


# ----------------------------------------------------------------------------- argument checks
def _check_inputs(query, key, value, rpb, kernel_size: int, dilation: int) -> None:
    if query.dim() != 5:
        raise ValueError(
            "Expected query of shape [batch, height, width, heads, head_dim], "
            f"got {tuple(query.shape)}."
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
def _neighbors_1d(length: int, kernel_size: int, dilation: int):
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
    padded keys. Tiles with the same window pattern form runs of consecutive tiles.
    """

    tile: int
    num_tiles: int
    region: int
    first_query: int  # <= 0
    first_key: int  # <= 0
    # [num_patterns, tile, region]: rpb index of each (query, key) pair, -1 outside the window
    patterns: torch.Tensor
    runs: Tuple[Tuple[int, int], ...]  # (number of consecutive tiles, their pattern index)


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
        for first_query in range(0, half - tile, -1):  # the first tile keeps >= half + 1 queries
            num_tiles = math.ceil((length - first_query) / tile)
            last_real = length - (first_query + (num_tiles - 1) * tile)
            logits = num_tiles * tile * (tile + kernel_size - 1)
            if num_tiles > 1 and last_real >= half + 1 and logits < best[0]:
                best = (logits, tile, num_tiles, first_query)
                break
    return best[1:]


def _axis_tiling(length: int, kernel_size: int, max_tile: int) -> _AxisTiling:
    tile, num_tiles, first_query = _tile_layout(length, kernel_size, max_tile)
    if num_tiles == 1:
        region, first_key = length, 0
    else:
        region, first_key = tile + kernel_size - 1, first_query - kernel_size // 2
    tile_start = torch.arange(num_tiles)[:, None] * tile
    # Padded queries take the window of the nearest real query (keeps every softmax row finite).
    queries = (first_query + tile_start + torch.arange(tile)).clamp(0, length - 1)
    keys = first_key + tile_start + torch.arange(region)  # [num_tiles, region]
    starts = (queries - kernel_size // 2).clamp(0, length - kernel_size)
    offset = keys[:, None, :] - starts[:, :, None]  # position of the key inside the query's window
    in_window = (offset >= 0) & (offset < kernel_size)
    bias_index = keys[:, None, :] - queries[:, :, None] + kernel_size - 1
    code = torch.where(in_window, bias_index, torch.full_like(bias_index, -1))
    patterns, pattern_of_tile = torch.unique(code.flatten(1), dim=0, return_inverse=True)
    runs, first = [], 0
    for t in range(1, num_tiles + 1):
        if t == num_tiles or pattern_of_tile[t] != pattern_of_tile[first]:
            runs.append((t - first, int(pattern_of_tile[first])))
            first = t
    return _AxisTiling(
        tile, num_tiles, region, first_query, first_key, patterns.view(-1, tile, region),
        tuple(runs),
    )


class _GridTiling(NamedTuple):
    rows: _AxisTiling
    cols: _AxisTiling
    # [Ph * Th * Rh] rpb row index of every (pattern, query, key), clamped to >= 0
    row_index: torch.Tensor
    # [2k - 1, Pw * Tw * Rw] one-hot rpb column index (all 0 outside the window)
    col_one_hot: torch.Tensor
    # [Ph, Pw, 1, Th * Tw, Rh * Rw] additive mask: 0 inside the window, -inf outside
    window_mask: torch.Tensor


@functools.lru_cache(maxsize=64)
def _grid_tiling(
    height: int, width: int, kernel_size: int, max_tile: int, device: torch.device, dtype
) -> _GridTiling:
    """Tiling of an ``H x W`` dense group and its window masks (cached: the blocks of a level
    share their geometry)."""
    rows = _axis_tiling(height, kernel_size, max_tile)
    cols = _axis_tiling(width, kernel_size, max_tile)
    rows_out = rows.patterns[:, None, :, None, :, None] < 0
    cols_out = cols.patterns[None, :, None, :, None, :] < 0
    window_mask = torch.zeros((rows_out | cols_out).shape, dtype=dtype)
    window_mask = window_mask.masked_fill(rows_out | cols_out, float("-inf")).unsqueeze(2)
    window_mask = window_mask.flatten(5, 6).flatten(3, 4)  # [Ph, Pw, 1, Th*Tw, Rh*Rw]
    col_codes = cols.patterns.flatten()
    col_one_hot = (col_codes[None, :] == torch.arange(2 * kernel_size - 1)[:, None]).to(dtype)
    row_index = rows.patterns.flatten().clamp(min=0)
    return _GridTiling(
        rows, cols, row_index.to(device), col_one_hot.to(device), window_mask.to(device)
    )


def _bias_table(grid: _GridTiling, rpb) -> torch.Tensor:
    """Additive logits bias (rpb inside the window, -inf outside) for every pair of tile patterns:
    ``[Ph, Pw, heads or 1, tile_h * tile_w, region_h * region_w]``."""
    if rpb is None:
        return grid.window_mask
    rows, cols = grid.rows, grid.cols
    # rpb[h, row code, col code] as a gather of rows and a product with the one-hot column codes
    # (exact: one non-zero term), instead of a gather of every element.
    by_rows = rpb.to(grid.col_one_hot.dtype)[:, grid.row_index]  # [heads, Ph*Th*Rh, 2k-1]
    table = torch.matmul(by_rows, grid.col_one_hot)  # [heads, Ph*Th*Rh, Pw*Tw*Rw]
    num_h, num_w = rows.patterns.shape[0], cols.patterns.shape[0]
    table = table.view(-1, num_h, rows.tile, rows.region, num_w, cols.tile, cols.region)
    table = table.permute(1, 4, 0, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)  # [Ph, Pw, heads, T, R]
    return table + grid.window_mask


def _pad_axes(x, first_h: int, first_w: int, size_h: int, size_w: int):
    """Zero-pad ``[N, H, W, heads, D]`` to ``[first, first + size)`` on the two spatial axes."""
    pads = (-first_w, size_w + first_w - x.shape[2], -first_h, size_h + first_h - x.shape[1])
    return F.pad(x, (0, 0, 0, 0) + pads) if any(pads) else x


def _na2d_dense_grid(query, key, value, rpb, kernel_size, scale, max_tile, max_logits):
    """Dilation-1 neighborhood attention of ``[N, H, W, heads, D]`` tensors."""
    n, height, width, heads, _ = query.shape
    grid = _grid_tiling(height, width, kernel_size, max_tile, query.device, query.dtype)
    rows, cols = grid.rows, grid.cols
    table = _bias_table(grid, rpb)

    def query_tiles(x):  # -> [N, tiles_h, tiles_w, heads, Th, Tw, D] (view)
        size_h, size_w = rows.num_tiles * rows.tile, cols.num_tiles * cols.tile
        x = _pad_axes(x, rows.first_query, cols.first_query, size_h, size_w)
        x = x.unflatten(2, (cols.num_tiles, cols.tile)).unflatten(1, (rows.num_tiles, rows.tile))
        return x.permute(0, 1, 3, 5, 2, 4, 6)

    def key_regions(x):  # -> [N, tiles_h, tiles_w, heads, Rh, Rw, D] (strided view)
        x = _pad_axes(
            x,
            rows.first_key,
            cols.first_key,
            (rows.num_tiles - 1) * rows.tile + rows.region,
            (cols.num_tiles - 1) * cols.tile + cols.region,
        )
        x = x.unfold(1, rows.region, rows.tile).unfold(2, cols.region, cols.tile)
        return x.permute(0, 1, 2, 3, 5, 6, 4)

    # Pieces of tiles sharing one mask: tile rows and columns are cut where the window pattern
    # changes, tile rows also into chunks of at most max_logits logits when one sample exceeds it;
    # each piece then runs on as many samples at once as fit in max_logits. The pieces come from
    # torch.split (one cheap backward per split, unlike indexing).
    logits_per_tile = heads * rows.tile * cols.tile * rows.region * cols.region
    per_tile_row = cols.num_tiles * logits_per_tile
    rows_per_chunk = rows.num_tiles
    if rows.num_tiles * per_tile_row > max_logits:
        rows_per_chunk = max(1, max_logits // per_tile_row)
    row_pieces = [
        (size, pattern)
        for count, pattern in rows.runs
        for size in _chunk_sizes(count, rows_per_chunk)
    ]

    tiles = (query_tiles(query), key_regions(key), key_regions(value))
    out_rows = []
    row_split = _split_alike(tiles, [size for size, _ in row_pieces], dim=1)
    for row_tiles, (num_rows, row_pattern) in zip(row_split, row_pieces):
        out_cols = []
        col_split = _split_alike(row_tiles, [count for count, _ in cols.runs], dim=2)
        for piece, (num_cols, col_pattern) in zip(col_split, cols.runs):
            mask = table[row_pattern, col_pattern]
            samples_per_chunk = max(1, max_logits // (num_rows * num_cols * logits_per_tile))
            chunks = _split_alike(piece, samples_per_chunk, dim=0)
            out_cols.append(_cat([_attend_tiles(*chunk, mask, scale) for chunk in chunks], dim=0))
        out_rows.append(_cat(out_cols, dim=2))
    out = _cat(out_rows, dim=1)  # [N, tiles_h, tiles_w, heads, Th*Tw, Dv]
    out = out.unflatten(4, (rows.tile, cols.tile)).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(n, rows.num_tiles * rows.tile, cols.num_tiles * cols.tile, heads, -1)
    return out[:, -rows.first_query :, -cols.first_query :][:, :height, :width]


def _attend_tiles(q_tiles, k_regions, v_regions, mask, scale: float):
    """Attention of ``[n, rows, cols, heads, ...]`` query tiles to their key regions, with one mask
    ``[heads or 1, tile tokens, region tokens]`` for all; returns ``[n, rows, cols, heads, T, Dv]``.
    """
    # [n * rows * cols, heads, tokens, D]: the layout of scaled_dot_product_attention's fused CPU
    # kernel, the mask broadcast over the tiles. (PyTorch runs its math backend instead when the
    # mask requires grad.)
    q, k, v = (x.flatten(4, 5).flatten(0, 2) for x in (q_tiles, k_regions, v_regions))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)
    return out.view(*q_tiles.shape[:4], *out.shape[-2:])


def _cat(tensors, dim: int):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _chunk_sizes(total: int, step: int):
    return [min(step, total - i) for i in range(0, total, step)]


def _split_alike(tensors, split_size_or_sections, dim: int):
    """``Tensor.split`` every tensor the same way; yields tuples of corresponding pieces."""
    return zip(*(x.split(split_size_or_sections, dim=dim) for x in tensors))


class _GroupClass(NamedTuple):
    count: int  # number of dilation groups of this class
    length: int  # their common length


def _group_classes(length: int, dilation: int):
    """The dilation groups along an axis, in order, form <= 2 classes of equal length."""
    full, rest = divmod(length, dilation)
    classes = [_GroupClass(rest, full + 1), _GroupClass(dilation - rest, full)]
    return [c for c in classes if c.count]


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

    Same arguments and result as :func:`na2d_reference`. ``max_tile``: largest query-tile side
    tried (sides up to ``kernel_size`` are always tried); ``max_logits``: about how many logits
    one chunk covers. Without autograd (or without rpb) the chunks run PyTorch's fused attention
    kernel; with a rpb that requires grad, PyTorch's math attention (the softmax of every chunk is
    kept for the backward pass).
    """
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    scale = _default_scale(query, scale)
    if dilation == 1:
        return _na2d_dense_grid(query, key, value, rpb, kernel_size, scale, max_tile, max_logits)

    batch, height, width, heads, _ = query.shape
    per_group_h, per_group_w = -(-height // dilation), -(-width // dilation)

    def to_groups(x):  # [B, H, W, heads, D] -> [B, d, d, H/d, W/d, heads, D] (view of the padded x)
        x = _pad_axes(x, 0, 0, per_group_h * dilation, per_group_w * dilation)
        x = x.unflatten(2, (per_group_w, dilation)).unflatten(1, (per_group_h, dilation))
        return x.permute(0, 2, 4, 1, 3, 5, 6)

    row_classes, col_classes = _group_classes(height, dilation), _group_classes(width, dilation)
    groups = (to_groups(query), to_groups(key), to_groups(value))
    out_rows = []
    row_split = _split_alike(groups, [c.count for c in row_classes], dim=1)
    for rows, row_groups in zip(row_classes, row_split):
        out_cols = []
        col_split = _split_alike(row_groups, [c.count for c in col_classes], dim=2)
        for cols, piece in zip(col_classes, col_split):
            # [B, groups_h, groups_w, h, w, heads, D] -> [B * groups_h * groups_w, h, w, heads, D]
            q, k, v = (x[:, :, :, : rows.length, : cols.length].flatten(0, 2) for x in piece)
            res = _na2d_dense_grid(q, k, v, rpb, kernel_size, scale, max_tile, max_logits)
            res = res.view(batch, rows.count, cols.count, *res.shape[1:])
            # Back to the padded group size (the padding is cropped below).
            res = _pad_axes(res.flatten(0, 2), 0, 0, per_group_h, per_group_w)
            out_cols.append(res.view(batch, rows.count, cols.count, *res.shape[1:]))
        out_rows.append(_cat(out_cols, dim=2))
    out = _cat(out_rows, dim=1).permute(0, 3, 1, 4, 2, 5, 6)  # [B, H/d, d, W/d, d, heads, Dv]
    out = out.reshape(batch, per_group_h * dilation, per_group_w * dilation, heads, -1)
    return out[:, :height, :width]


# ----------------------------------------------------------------------------- flex attention
def _flex_mods(height: int, width: int, kernel_size: int, dilation: int, rpb, device):
    """``(score_mod, mask_mod)`` of flex attention over the row-major flattened ``H x W`` tokens.

    The geometry is captured as tensors, not Python numbers, so that ``torch.compile`` does not
    specialise (and recompile) on every feature-map size and dilation of the network. Both mods
    only use broadcasting tensor ops, so they can also be evaluated on dense index grids.
    """
    geometry = (height, width, kernel_size, dilation)
    height, width, kernel, dilation = (torch.tensor(v, device=device) for v in geometry)
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


_BLOCK_MASKS: Dict[tuple, object] = {}
_COMPILED_FLEX: Dict[str, Callable] = {}


def _block_mask(height: int, width: int, kernel_size: int, dilation: int, device, compile: bool):
    """Flex attention block mask of the neighborhoods (cached per geometry and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cache_key = (height, width, kernel_size, dilation, str(device), compile)
    if cache_key not in _BLOCK_MASKS:
        _, mask_mod = _flex_mods(height, width, kernel_size, dilation, None, device)
        tokens = height * width
        # Compiled mask creation works block by block instead of on the dense tokens x tokens grid.
        _BLOCK_MASKS[cache_key] = create_block_mask(
            mask_mod, None, None, tokens, tokens, device=device, _compile=compile
        )
    return _BLOCK_MASKS[cache_key]


def _flex_attention_fn(compile: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "compiled" not in _COMPILED_FLEX:
        _COMPILED_FLEX["compiled"] = torch.compile(flex_attention)
    return _COMPILED_FLEX["compiled"]


def na2d_flex(query, key, value, rpb, kernel_size, dilation=1, scale=None, compile=None):
    """Neighborhood attention with ``torch.nn.attention.flex_attention``.

    Same arguments and result as :func:`na2d_reference`. ``compile``: run flex attention (and the
    block-mask creation) through ``torch.compile`` (default: on CUDA tensors only). Eager flex
    attention runs on CPU (slowly, as a dense masked product) for the forward pass only: PyTorch
    has no flex backward on CPU.
    """
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    batch, height, width, heads, _ = query.shape
    if compile is None:
        compile = query.device.type == "cuda"
    score_mod, _ = _flex_mods(height, width, kernel_size, dilation, rpb, query.device)
    block_mask = _block_mask(height, width, kernel_size, dilation, query.device, compile)

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
        raise ValueError(
            "NATTEN >= 0.20 has no relative positional bias; use impl 'tiled' or 'flex'."
        )
    _check_inputs(query, key, value, rpb, kernel_size, dilation)
    try:
        from natten.functional import na2d as natten_na2d
    except ImportError as e:
        raise ImportError("The 'natten' implementation needs `pip install natten`.") from e
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


def _check_impl_name(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"Unknown neighborhood attention implementation {impl!r}; one of {ATTENTION_IMPLS}."
        )


def resolve_attention_impl(impl: str, device, has_rpb: bool) -> str:
    """Concrete implementation for ``impl`` on ``device``; logs each new choice once.

    ``"auto"``: NATTEN's fused kernel when there is no rpb and NATTEN has its compiled library on
    this (CUDA) device; else flex attention on CUDA; else the tiled path.
    """
    _check_impl_name(impl)
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
        raise ValueError(
            "ATTENTION_IMPL 'natten' requires the relative positional bias to be disabled."
        )
    choice = (impl, resolved, device.type, has_rpb)
    if choice not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(choice)
        logger.info(
            "Neighborhood attention: implementation %r (requested %r) on %s, rpb %s.",
            resolved,
            impl,
            device.type,
            "on" if has_rpb else "off",
        )
    return resolved


def na2d(query, key, value, rpb, kernel_size: int, dilation=1, scale=None, impl: str = "auto"):
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
            raise ValueError("Attention dropout is not supported by neighborhood attention here.")
        _check_impl_name(impl)
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
