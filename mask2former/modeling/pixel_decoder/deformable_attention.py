"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

Two implementations of the same operator are provided here, both running on CPU and GPU without
a compiled extension (a third, Triton kernels for GPUs, is in ``deformable_attention_triton``, and
a fourth, C++ kernels for CPU tensors compiled on first use, in ``deformable_attention_cpu``):

* :func:`ms_deform_attn_pytorch`: the reference. One ``grid_sample`` per level, then a weighted
  sum over levels and points (the official PyTorch path of Deformable DETR / Mask2Former).
* :func:`ms_deform_attn_fast`: the same numbers (forward and backward, fp32 rounding), computed
  as a sparse weighted gather. Every sampling point is expanded into its four bilinear corners;
  the output row of each (query, head) is the weighted sum of the 4 * n_levels * n_points value
  rows the corners point at, which one ``F.embedding_bag`` call computes without materialising
  the sampled values. The value maps are zero-padded so that corners outside a map read zeros
  (``grid_sample``'s ``padding_mode="zeros"``) without validity masks. The hand-written backward
  sorts the sampling points by the value row they read, once, and uses sparse CSR products for
  the gradients of the values (a scatter-add, as a transposed sparse-dense product) and of the
  corner weights (a sampled dense-dense product), from which the gradients of the sampling
  locations and attention weights follow in closed form.

:class:`MSDeformAttn` is the attention module with the official parameter names and
initialisation.
"""

import functools
import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ...kernels import cpu_or_fallback
from .deformable_attention_cpu import ms_deform_attn_cpu_logits, ms_deform_attn_cpu_pixels
from .deformable_attention_triton import ms_deform_attn_triton, triton_available

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_fast",
    "ms_deform_attn_cpu",
    "MS_DEFORM_ATTN_IMPLS",
    "resolve_impl",
]

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]


def _shape_list(value_spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """(H, W) of each level as python ints, from a sequence of pairs or a [L, 2] tensor (a device
    tensor is read back to the host, a blocking copy: pass Python pairs to avoid it)."""
    if isinstance(value_spatial_shapes, torch.Tensor):
        value_spatial_shapes = value_spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in value_spatial_shapes]


class _LevelConstants(NamedTuple):
    """Small per-level tensors of a set of level shapes on one device, in one dtype."""

    sizes: torch.Tensor  # [L, 2] (W, H) of each level
    minus_half: torch.Tensor  # 0-dim -0.5 (pixel centres: location * size - 0.5)
    minus_one: torch.Tensor  # 0-dim -1.0 (lower clamp of the sampling pixels)


@functools.lru_cache(maxsize=64)
def _level_constants(
    shapes: Tuple[Tuple[int, int], ...], device: torch.device, dtype: torch.dtype
) -> _LevelConstants:
    """The :class:`_LevelConstants` of ``shapes``, built once per (shapes, device, dtype) and
    returned as the same tensors afterwards (each is a blocking host-to-device copy on a GPU).
    Built outside inference mode: autograd may save them for backward in a later training step.
    """
    with torch.inference_mode(False):
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)
        return _LevelConstants(sizes, sizes.new_tensor(-0.5), sizes.new_tensor(-1.0))


def _constants(shapes: Sequence[Tuple[int, int]], like: torch.Tensor) -> _LevelConstants:
    """:func:`_level_constants` on the device and in the dtype of ``like``."""
    return _level_constants(tuple(shapes), like.device, like.dtype)


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention (bilinear ``grid_sample`` per level).

    Args:
        value: [N, S, M, D], the flattened maps of all levels (S = sum of H_l * W_l), M heads.
        value_spatial_shapes: (H_l, W_l) per level, as Python pairs or a [L, 2] tensor (a device
            tensor is read back to the host: pass pairs to avoid that blocking copy).
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y) in [0, 1]; (0, 0) is the
            top-left corner of the top-left pixel (``align_corners=False``); points outside
            sample zeros.
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * D].
    """
    shapes = _shape_list(value_spatial_shapes)
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------------------ fast
# Zero padding of each level map in the gather table: 1 row/column before, 2 after. Sampling
# coordinates are clamped to [-1, size] (pixel units), so a corner lies in [-1, size + 1].
_PAD_BEFORE = 1
_PAD_AFTER = 2


class _PaddedLevels:
    """Geometry of the zero-padded level maps stacked into one gather table whose row
    ``(n * positions + s) * M + m`` is head m of padded position s of image n."""

    def __init__(self, shapes: List[Tuple[int, int]]):
        pad = _PAD_BEFORE + _PAD_AFTER
        self.shapes = shapes
        self.row_lengths = [w + pad for _, w in shapes]
        self.starts = []
        self.positions = 0
        for h, w in shapes:
            self.starts.append(self.positions)
            self.positions += (h + pad) * (w + pad)

    def pad(self, value: torch.Tensor) -> torch.Tensor:
        """[N, S, M, D] -> table [N * positions * M, D]."""
        n, _, m, d = value.shape
        pad = (0, 0, _PAD_BEFORE, _PAD_AFTER, _PAD_BEFORE, _PAD_AFTER)
        levels = value.split([h * w for h, w in self.shapes], dim=1)
        padded = [
            F.pad(v.reshape(n, h, w, m * d), pad).flatten(1, 2)
            for (h, w), v in zip(self.shapes, levels)
        ]
        return torch.cat(padded, dim=1).reshape(n * self.positions * m, d)

    def unpad(self, table: torch.Tensor, num_images: int, num_heads: int) -> torch.Tensor:
        """Inverse of :meth:`pad` (the padding rows are dropped): -> [N, S, M, D]."""
        d = table.shape[-1]
        table = table.view(num_images, self.positions, num_heads * d)
        levels = []
        for (h, w), start, row in zip(self.shapes, self.starts, self.row_lengths):
            end = start + (h + _PAD_BEFORE + _PAD_AFTER) * row
            level = table[:, start:end].view(num_images, -1, row, num_heads * d)
            level = level[:, _PAD_BEFORE : _PAD_BEFORE + h, _PAD_BEFORE : _PAD_BEFORE + w]
            levels.append(level.reshape(num_images, h * w, -1))
        return torch.cat(levels, dim=1).view(num_images, -1, num_heads, d)

    def corner_rows(
        self, corner0: torch.Tensor, num_images: int, num_heads: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Table rows [4, L * P, B] of the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
        (x0 + 1, y0 + 1), from the planar top-left corners [L, P, 2, B] (pixel units)."""
        n_levels, n_points, _, bags = corner0.shape
        m, device = num_heads, corner0.device
        corner0 = corner0.to(dtype)
        row_len, level_base = _corner_constants(tuple(self.shapes), m, device, dtype)
        images = torch.arange(num_images, dtype=dtype, device=device).view(-1, 1, 1)
        heads = torch.arange(m, dtype=dtype, device=device).view(1, 1, m)
        image_head = images * (self.positions * m) + heads
        image_head = image_head.expand(num_images, bags // (num_images * m), m).reshape(bags)
        row0 = corner0[:, :, 1] * (row_len * m) + corner0[:, :, 0] * m + (level_base + image_head)
        offsets = torch.stack(
            [torch.zeros_like(row_len), torch.ones_like(row_len), row_len, row_len + 1]
        )
        return (row0.unsqueeze(0) + offsets * m).view(4, n_levels * n_points, bags)


@functools.lru_cache(maxsize=64)
def _corner_constants(
    shapes: Tuple[Tuple[int, int], ...], num_heads: int, device: torch.device, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(row_len, level_base)`` [L, 1, 1] of :meth:`_PaddedLevels.corner_rows`: the padded row
    length of each level and the table row of its first (unpadded) pixel for head 0 of image 0;
    built once per (shapes, heads, device, dtype), outside inference mode."""
    levels = _PaddedLevels(list(shapes))
    # first row of each level, shifted by the padding before (x0 = y0 = 0 is padded (1, 1))
    level_base = [
        (start + _PAD_BEFORE * (row + 1)) * num_heads
        for start, row in zip(levels.starts, levels.row_lengths)
    ]
    with torch.inference_mode(False):
        row_len = torch.tensor(levels.row_lengths, dtype=dtype, device=device)
        level_base = torch.tensor(level_base, dtype=dtype, device=device)
        return row_len.view(len(shapes), 1, 1), level_base.view(len(shapes), 1, 1)


def _level_sizes(shapes: List[Tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """(W, H) of each level as a [L, 1, 2, 1] tensor (broadcasts over planar [L, P, 2, B])."""
    return _constants(shapes, like).sizes.view(len(shapes), 1, 2, 1)


def _bag_major(planar: torch.Tensor) -> torch.Tensor:
    """[4, K, B] -> [B, 4 * K] (a 2-D transpose: blocked copy kernel)."""
    return planar.reshape(-1, planar.shape[-1]).t().contiguous()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]):
    """A sparse CSR matrix from trusted indices (no invariant checks, no beta-API warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _MSDeformAttnFastFunction(torch.autograd.Function):
    """Deformable attention on planar inputs, with a hand-written backward.

    Inputs: value [N, S, M, D]; pixel [L, P, 2, B] sampling (x, y) in pixels of their level
    (pixel centres at integers); weights [L, P, B] attention weights; B = N * Lq * M bags
    (image-major, then query, then head). Output [B, D].

    The arithmetic runs on "planar" tensors (level, point, coordinate or corner outermost, bags
    innermost and contiguous): in the natural layout every broadcast over levels or corners makes
    the innermost loop 2 or 4 elements long, several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, value, pixel, weights, shapes):
        n, _, m, _ = value.shape
        n_levels, n_points, _, bags = pixel.shape
        levels = _PaddedLevels(shapes)
        table = levels.pad(value)
        index_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64

        # Clamp to [-1, size]: beyond that both corners read zeros anyway, and the clamp keeps
        # every corner inside the padded map (zero gradient there, as grid_sample has).
        clamped = torch.clamp(
            pixel, min=_constants(shapes, pixel).minus_one, max=_level_sizes(shapes, pixel)
        )
        corner0 = clamped.floor()
        frac = (clamped - corner0).view(n_levels * n_points, 2, bags)
        index = levels.corner_rows(corner0, n, m, index_dtype)  # [4, K, B]
        fx, fy = frac[:, 0], frac[:, 1]
        weights = weights.reshape(n_levels * n_points, bags)
        weight_y = torch.stack([(1 - fy) * weights, fy * weights])
        weight_x = torch.stack([1 - fx, fx])
        weight = (weight_y.unsqueeze(1) * weight_x.unsqueeze(0)).view(4, n_levels * n_points, bags)

        out = F.embedding_bag(
            _bag_major(index), table, per_sample_weights=_bag_major(weight), mode="sum"
        )
        ctx.save_for_backward(table, index, weight, frac, weights, clamped == pixel)
        ctx.levels, ctx.value_shape = levels, value.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        table, index, weight, frac, weights, inside = ctx.saved_tensors
        levels = ctx.levels
        n, _, m, _ = ctx.value_shape
        need_value, need_pixel, need_weights = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        num_rows = table.shape[0]
        _, points_per_bag, num_bags = index.shape

        # Sort the points (enumerated bag-major) by the table row of their first corner, once.
        # Then the rows of every corner are sorted too and the bags within a row ascend:
        # canonical CSR matrices (table rows x bags), one per corner.
        order = torch.argsort(index[0].t().reshape(-1), stable=True)
        bags = torch.div(order, points_per_bag, rounding_mode="floor")
        planar_pos = (order - bags * points_per_bag) * num_bags + bags  # position in [K, B]
        bags = bags.to(index.dtype)
        grad_table = torch.zeros_like(table) if need_value else None
        # gradient w.r.t. the corner weights: grad_out[bag] . table[row]
        grad_corner = None
        if need_pixel or need_weights:
            grad_corner = weight.new_empty(4, points_per_bag * num_bags)
        row_starts = torch.arange(num_rows + 1, dtype=index.dtype, device=index.device)
        for c in range(4):
            rows = index[c].reshape(-1).index_select(0, planar_pos)
            values = weight[c].reshape(-1).index_select(0, planar_pos)
            crow = torch.searchsorted(rows, row_starts, out_int32=index.dtype == torch.int32)
            if need_value:
                # transposed sparse product: table row r gets sum of weight * grad_out[bag]
                grad_table += F.embedding_bag(
                    bags, grad_out, crow[:-1], per_sample_weights=values, mode="sum"
                )
            if grad_corner is not None:
                corner = _csr(crow, bags, values, (num_rows, num_bags))
                dots = torch.sparse.sampled_addmm(corner, table, grad_out.t(), beta=0.0).values()
                grad_corner[c].index_copy_(0, planar_pos, dots)

        grad_value = levels.unpad(grad_table, n, m) if need_value else None
        grad_pixel = grad_weights = None
        if grad_corner is not None:
            g00, g10, g01, g11 = grad_corner.view(4, points_per_bag, num_bags)
            fx, fy = frac[:, 0], frac[:, 1]
            if need_weights:
                # sum over corners of grad * bilinear weight
                top, bottom = g00 * (1 - fx) + g10 * fx, g01 * (1 - fx) + g11 * fx
                grad_weights = top * (1 - fy) + bottom * fy
                grad_weights = grad_weights.view(inside.shape[0], inside.shape[1], num_bags)
            if need_pixel:
                grad_fx = ((g10 - g00) * (1 - fy) + (g11 - g01) * fy) * weights
                grad_fy = ((g01 - g00) * (1 - fx) + (g11 - g10) * fx) * weights
                grad_pixel = torch.stack([grad_fx, grad_fy], dim=1).view(inside.shape) * inside
        return grad_value, grad_pixel, grad_weights, None


def _ms_deform_attn_fast_planar(
    value: torch.Tensor, shapes: List[Tuple[int, int]], pixel: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Fast path on planar inputs: pixel [L, P, 2, N*Lq*M] (x, y in pixels of their level),
    weights [L, P, N*Lq*M]; value [N, S, M, D] -> [N, Lq, M * D]."""
    n, s, m, d = value.shape
    if s != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {s} positions, spatial shapes {shapes} give another number")
    pixel, weights = pixel.to(value.dtype), weights.to(value.dtype)
    output = _MSDeformAttnFastFunction.apply(value, pixel, weights, shapes)
    return output.view(n, -1, m * d)


def ms_deform_attn_fast(
    value: torch.Tensor,
    value_spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention as a sparse weighted gather; same arguments, result and
    gradients as :func:`ms_deform_attn_pytorch` (up to fp32 rounding)."""
    shapes = _shape_list(value_spatial_shapes)
    n, lq, m, n_levels, n_points, _ = sampling_locations.shape
    bags = n * lq * m
    # [N, Lq, M, L, P, 2] -> planar [L, P, 2, B] (a 2-D transpose), then to pixels
    locations = sampling_locations.reshape(bags, -1).t().contiguous()
    locations = locations.view(n_levels, n_points, 2, bags)
    minus_half = _constants(shapes, locations).minus_half
    pixel = torch.addcmul(minus_half, locations, _level_sizes(shapes, locations))
    weights = attention_weights.reshape(bags, -1).t().contiguous()
    weights = weights.view(n_levels, n_points, bags)
    return _ms_deform_attn_fast_planar(value, shapes, pixel, weights)


def ms_deform_attn_cpu(
    value: torch.Tensor,
    value_spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention on the compiled CPU kernels (float32 or float64 CPU
    tensors); same arguments, result and gradients as :func:`ms_deform_attn_pytorch` (up to
    rounding)."""
    shapes = _shape_list(value_spatial_shapes)
    n_levels = sampling_locations.shape[3]
    if len(shapes) != n_levels:
        raise ValueError(f"{len(shapes)} level shapes for {n_levels} levels of sampling locations")
    constants = _constants(shapes, sampling_locations)
    pixel = torch.addcmul(
        constants.minus_half, sampling_locations, constants.sizes.view(n_levels, 1, 2)
    )
    return ms_deform_attn_cpu_pixels(value, shapes, pixel, attention_weights)


MS_DEFORM_ATTN_IMPLS = {
    "pytorch": ms_deform_attn_pytorch,
    "fast": ms_deform_attn_fast,
    "cpu": ms_deform_attn_cpu,
    "triton": ms_deform_attn_triton,
}


def _cpu_default() -> str:
    """ "cpu" when the CPU kernels build and load here, else "fast" (saying why, once)."""
    return cpu_or_fallback("Deformable attention on CPU", "fast")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device``: "auto" is "cpu" (the compiled
    kernels) on CPU, or "fast" where they cannot be built (with a warning saying why), "triton"
    on CUDA when Triton can run there, else "pytorch"; any other name is returned as it is."""
    if impl != "auto":
        return impl
    if device.type == "cpu":
        return _cpu_default()
    if device.type == "cuda" and triton_available(device):
        return "triton"
    return "pytorch"


# ---------------------------------------------------------------------------------------- module
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR), official names and init.

    Each query predicts, per head, level and point, a sampling offset (relative to its reference
    point, in pixels of that level) and an attention weight (softmax over levels x points), and
    attends to bilinearly sampled values.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        """
        Args:
            d_model: hidden dimension (divisible by ``n_heads``).
            n_levels: number of feature levels.
            n_heads: number of attention heads.
            n_points: sampling points per head per level.
            impl: "cpu", "fast", "pytorch" or "triton" (see :data:`MS_DEFORM_ATTN_IMPLS`; same
                numbers), or "auto" (:func:`resolve_impl`): "cpu" (compiled kernels) for CPU
                tensors, "triton" on CUDA when Triton is importable, else "pytorch"
                (``grid_sample``).
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        if impl not in MS_DEFORM_ATTN_IMPLS and impl != "auto":
            raise ValueError(
                f"Unknown deformable attention impl {impl!r}; one of "
                f"{sorted(MS_DEFORM_ATTN_IMPLS) + ['auto']}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Official init: offsets start on a ring of directions (one per head), the i-th point at
        distance i + 1 (max-norm); uniform attention; xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Optional[torch.Tensor] = None,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (of the padded maps), or
                [N, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, C], all levels flattened and concatenated.
            input_spatial_shapes: (H, W) per level, as Python pairs (e.g. a tuple of tuples) or
                a [L, 2] tensor (a device tensor is read back to the host on every call).
            input_level_start_index: [L] start of each level in ``input_flatten``; implied by the
                shapes, accepted for the official signature.
            input_padding_mask: optional bool [N, S], True on padded positions (their values are
                zeroed).

        Returns:
            [N, Lq, C].
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        shapes = _shape_list(input_spatial_shapes)
        if sum(h * w for h, w in shapes) != len_in:
            raise ValueError(
                f"input_flatten has {len_in} positions, spatial shapes {shapes} another number"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query)
        logits = self.attention_weights(query)

        with torch.autocast(device_type=query.device.type, enabled=False):
            # half precision (AMP) is not enough for sampling locations: compute in fp32 (or fp64)
            dtype = torch.promote_types(value.dtype, torch.float32)
            value, offsets, logits = value.to(dtype), offsets.to(dtype), logits.to(dtype)
            reference_points = reference_points.to(dtype)
            if reference_points.shape[-1] not in (2, 4):
                raise ValueError(
                    f"Last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}"
                )
            impl = resolve_impl(self.impl, value.device)
            if impl == "cpu" and reference_points.shape[-1] == 2:
                output = self._cpu_point_attention(value, shapes, reference_points, offsets, logits)
            elif impl == "fast" and reference_points.shape[-1] == 2:
                output = self._fast_point_attention(
                    value, shapes, reference_points, offsets, logits
                )
            else:
                m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
                offsets = offsets.view(n, len_q, m, n_levels, n_points, 2)
                weights = F.softmax(logits.view(n, len_q, m, n_levels * n_points), -1)
                weights = weights.view(n, len_q, m, n_levels, n_points)
                ref = reference_points[:, :, None, :, None, :]
                if reference_points.shape[-1] == 2:
                    normalizer = _constants(shapes, value).sizes[None, None, None, :, None, :]
                    locations = ref + offsets / normalizer
                else:
                    locations = ref[..., :2] + offsets / n_points * ref[..., 2:] * 0.5
                output = MS_DEFORM_ATTN_IMPLS[impl](value, shapes, locations, weights)
        return self.output_proj(output.to(query.dtype))

    def _cpu_point_attention(self, value, shapes, reference_points, offsets, logits):
        """The "cpu" kernels fed with the reference pixels, the offsets (in pixels) and the
        logits as the linear layers give them: the kernels add the offsets to the reference and
        take the softmax."""
        n, len_q, n_levels, _ = reference_points.shape
        constants = _constants(shapes, value)
        ref_pixel = torch.addcmul(constants.minus_half, reference_points, constants.sizes)
        offsets = offsets.view(n, len_q, self.n_heads, n_levels, self.n_points, 2)
        logits = logits.view(n, len_q, self.n_heads, n_levels * self.n_points)
        return ms_deform_attn_cpu_logits(value, shapes, ref_pixel, offsets, logits)

    def _fast_point_attention(self, value, shapes, reference_points, offsets, logits):
        """The "fast" implementation fed directly in its planar layout: sampling pixels are
        ``reference * size - 0.5 + offset`` (the same locations as the official
        ``reference + offset / size``, without materialising them) and the softmax runs over the
        planar logits (a softmax over 12 contiguous values per row is several times slower)."""
        n, len_q, n_levels, _ = reference_points.shape
        bags = n * len_q * self.n_heads
        constants = _constants(shapes, value)
        # reference pixel per level, repeated over heads: [L, 1, 2, B]
        ref_pixel = torch.addcmul(constants.minus_half, reference_points, constants.sizes)
        ref_pixel = ref_pixel[:, :, None].expand(n, len_q, self.n_heads, n_levels, 2)
        ref_pixel = ref_pixel.reshape(bags, n_levels * 2).t().contiguous()
        ref_pixel = ref_pixel.view(n_levels, 1, 2, bags)
        # [N, Lq, M * L * P * 2] -> [L, P, 2, B] and [N, Lq, M * L * P] -> [L, P, B]
        # (2-D transposes: blocked copy kernel)
        offsets = offsets.reshape(bags, -1).t().contiguous()
        offsets = offsets.view(n_levels, self.n_points, 2, bags)
        logits = logits.reshape(bags, -1).t().contiguous()
        weights = F.softmax(logits, dim=0).view(n_levels, self.n_points, bags)
        return _ms_deform_attn_fast_planar(value, shapes, offsets + ref_pixel, weights)
