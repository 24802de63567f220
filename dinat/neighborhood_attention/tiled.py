"""Pure-PyTorch tiled neighborhood attention with bounded memory (runs on any device; the
default on CPU).

The input is split into dense dilation groups, each cut into square query tiles attending to the
key region covering the windows of all its queries; keys outside a query's window are masked and
the rpb is added through the attention mask. Tiles with the same window pattern share one mask,
so each piece is one call of ``scaled_dot_product_attention``, in chunks of bounded size.
"""

import functools
import math
from typing import NamedTuple, Tuple

import torch
from torch.nn import functional as F

from .checks import check_inputs, default_scale

# About how many attention logits one call of the tiled path covers (a chunk of tiles): PyTorch's
# fused attention never holds them all, its math backend (training with rpb) does, plus the
# softmax: 2**22 fp32 logits = 16 MiB each.
_TILED_MAX_LOGITS = 1 << 22
# Largest query-tile side the tiled path tries beyond the kernel size; per axis it takes the tiling
# with the fewest logits (128 tokens, k = 11: tiles of 8, key regions of 18).
_TILED_MAX_TILE = 8


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
        tile,
        num_tiles,
        region,
        first_query,
        first_key,
        patterns.view(-1, tile, region),
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
@torch.compiler.assume_constant_result
def _grid_tiling(
    height: int, width: int, kernel_size: int, max_tile: int, device: torch.device, dtype
) -> _GridTiling:
    """Tiling of an ``H x W`` dense group and its window masks (cached: the blocks of a level
    share their geometry; built outside inference mode, so that masks first made during an
    inference-mode evaluation can still be saved for backward later)."""
    with torch.inference_mode(False):
        return _build_grid_tiling(height, width, kernel_size, max_tile, device, dtype)


def _build_grid_tiling(
    height: int, width: int, kernel_size: int, max_tile: int, device: torch.device, dtype
) -> _GridTiling:
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
    check_inputs(query, key, value, rpb, kernel_size, dilation)
    scale = default_scale(query, scale)
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
