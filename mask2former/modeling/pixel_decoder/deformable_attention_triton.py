"""Multi-scale deformable attention (Deformable DETR) as Triton kernels, for GPUs.

Computes the same function as ``ms_deform_attn_pytorch`` (bilinear sampling of every level with
zero padding and ``align_corners=False``: pixel centres at ``location * size - 0.5``), forward and
backward, without the per-level ``grid_sample`` calls and the [N * M, D, Lq, L * P] sampled tensor.

One program handles a block of queries of one (image, head) pair and the whole head dimension
(padded to a power of two and masked). For every level and point it loads the four bilinear
corners of each query as rows of ``value`` (corners outside the map are masked loads that read
zeros) and accumulates the weighted rows in fp32. The backward kernel recomputes the corners: the
value gradient is scattered with fp32 atomic adds into an fp32 buffer; the gradients of the
attention weights and sampling locations follow from the dot products of the output gradient with
the four corner rows.

Inputs may be of any float dtype; everything is computed and accumulated in fp32 and the results
(output and gradients) are returned in the dtype of the corresponding input.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (environment
variable ``TRITON_INTERPRET=1`` set before this module is imported), see :func:`triton_available`.
"""

import contextlib
import functools
from typing import List, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of PyTorch do not ship Triton
    triton = None

__all__ = ["ms_deform_attn_triton", "triton_available"]

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]

# Elements of the [queries, head dim] tile of one program (queries = this // padded head dim).
_TILE_ELEMENTS = 1024
_MAX_BLOCK_Q = 64

# Whether the kernels below were built for Triton's interpreter (decided when they are decorated).
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def triton_available(device: Union[torch.device, str]) -> bool:
    """Whether :func:`ms_deform_attn_triton` can run on tensors of ``device``: Triton is
    importable and the device is CUDA (compiled kernels), or the kernels were built for Triton's
    interpreter (``TRITON_INTERPRET=1`` at import) and the device is the CPU."""
    if triton is None:
        return False
    device = torch.device(device)
    if _INTERPRETED:
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _corner_setup(loc_ptr, loc_offset, q_mask, width, height):
        """Top-left corner (float and clamped int), fractions and validity of the four corners
        (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1) for a block of sampling points."""
        loc_x = tl.load(loc_ptr + loc_offset, mask=q_mask, other=0.0).to(tl.float32)
        loc_y = tl.load(loc_ptr + loc_offset + 1, mask=q_mask, other=0.0).to(tl.float32)
        wf = width.to(tl.float32)
        hf = height.to(tl.float32)
        x = loc_x * wf - 0.5
        y = loc_y * hf - 0.5
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        # validity from the float corners (no integer overflow for points far outside)
        x0_in = (x0f >= 0.0) & (x0f <= wf - 1.0)
        x1_in = (x0f >= -1.0) & (x0f <= wf - 2.0)
        y0_in = (y0f >= 0.0) & (y0f <= hf - 1.0)
        y1_in = (y0f >= -1.0) & (y0f <= hf - 2.0)
        # integer corner clamped into [-1, size] first: the float-to-int conversion of a point
        # far outside would overflow
        x0 = tl.minimum(tl.maximum(x0f, -1.0), wf).to(tl.int64)
        y0 = tl.minimum(tl.maximum(y0f, -1.0), hf).to(tl.int64)
        return x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in

    @triton.jit
    def _ms_deform_attn_forward_kernel(
        value_ptr,
        levels_ptr,
        loc_ptr,
        weight_ptr,
        out_ptr,
        num_queries,
        num_positions,
        num_query_blocks,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        image_head = pid // num_query_blocks
        image = image_head // NUM_HEADS
        head = image_head % NUM_HEADS
        q = (pid % num_query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        q_mask = q < num_queries
        qd_mask = q_mask[:, None] & (d < HEAD_DIM)[None, :]
        # bag = (image, query, head) row of the [N, Lq, M] layouts
        bag = (image.to(tl.int64) * num_queries + q) * NUM_HEADS + head
        value_base = value_ptr + image.to(tl.int64) * num_positions * NUM_HEADS * HEAD_DIM
        value_base += head * HEAD_DIM
        row_stride = NUM_HEADS * HEAD_DIM

        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for level in tl.static_range(NUM_LEVELS):
            height = tl.load(levels_ptr + 3 * level)
            width = tl.load(levels_ptr + 3 * level + 1)
            start = tl.load(levels_ptr + 3 * level + 2).to(tl.int64)
            # a loop, not unrolled: unrolling every point issues all corner loads at once and
            # spills registers (sm_90, 32 queries x 32 channels: 255 registers and a stack)
            for point in range(NUM_POINTS):
                k = level * NUM_POINTS + point
                attn = tl.load(
                    weight_ptr + bag * (NUM_LEVELS * NUM_POINTS) + k, mask=q_mask, other=0.0
                ).to(tl.float32)
                x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in = _corner_setup(
                    loc_ptr, (bag * (NUM_LEVELS * NUM_POINTS) + k) * 2, q_mask, width, height
                )
                row00 = start + y0 * width + x0
                ptr00 = value_base + row00[:, None] * row_stride + d[None, :]
                ptr01 = ptr00 + width * row_stride  # one row down
                m00 = qd_mask & (x0_in & y0_in)[:, None]
                m10 = qd_mask & (x1_in & y0_in)[:, None]
                m01 = qd_mask & (x0_in & y1_in)[:, None]
                m11 = qd_mask & (x1_in & y1_in)[:, None]
                v00 = tl.load(ptr00, mask=m00, other=0.0).to(tl.float32)
                v10 = tl.load(ptr00 + row_stride, mask=m10, other=0.0).to(tl.float32)
                v01 = tl.load(ptr01, mask=m01, other=0.0).to(tl.float32)
                v11 = tl.load(ptr01 + row_stride, mask=m11, other=0.0).to(tl.float32)
                top = v00 * (1.0 - fx)[:, None] + v10 * fx[:, None]
                bottom = v01 * (1.0 - fx)[:, None] + v11 * fx[:, None]
                sampled = top * (1.0 - fy)[:, None] + bottom * fy[:, None]
                acc += attn[:, None] * sampled
        out_ptrs = out_ptr + bag[:, None] * HEAD_DIM + d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=qd_mask)

    @triton.jit
    def _ms_deform_attn_backward_kernel(
        value_ptr,
        levels_ptr,
        loc_ptr,
        weight_ptr,
        grad_out_ptr,
        grad_value_ptr,
        grad_loc_ptr,
        grad_weight_ptr,
        num_queries,
        num_positions,
        num_query_blocks,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        GRAD_VALUE: tl.constexpr,
        GRAD_SAMPLING: tl.constexpr,
    ):
        pid = tl.program_id(0)
        image_head = pid // num_query_blocks
        image = image_head // NUM_HEADS
        head = image_head % NUM_HEADS
        q = (pid % num_query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        q_mask = q < num_queries
        qd_mask = q_mask[:, None] & (d < HEAD_DIM)[None, :]
        bag = (image.to(tl.int64) * num_queries + q) * NUM_HEADS + head
        image_offset = image.to(tl.int64) * num_positions * NUM_HEADS * HEAD_DIM + head * HEAD_DIM
        row_stride = NUM_HEADS * HEAD_DIM
        grad_out = tl.load(
            grad_out_ptr + bag[:, None] * HEAD_DIM + d[None, :], mask=qd_mask, other=0.0
        ).to(tl.float32)

        for level in tl.static_range(NUM_LEVELS):
            height = tl.load(levels_ptr + 3 * level)
            width = tl.load(levels_ptr + 3 * level + 1)
            start = tl.load(levels_ptr + 3 * level + 2).to(tl.int64)
            for point in tl.static_range(NUM_POINTS):
                k = level * NUM_POINTS + point
                weight_offset = bag * (NUM_LEVELS * NUM_POINTS) + k
                attn = tl.load(weight_ptr + weight_offset, mask=q_mask, other=0.0)
                attn = attn.to(tl.float32)
                x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in = _corner_setup(
                    loc_ptr, weight_offset * 2, q_mask, width, height
                )
                row00 = start + y0 * width + x0
                off00 = image_offset + row00[:, None] * row_stride + d[None, :]
                off10 = off00 + row_stride
                off01 = off00 + width * row_stride
                off11 = off01 + row_stride
                m00 = qd_mask & (x0_in & y0_in)[:, None]
                m10 = qd_mask & (x1_in & y0_in)[:, None]
                m01 = qd_mask & (x0_in & y1_in)[:, None]
                m11 = qd_mask & (x1_in & y1_in)[:, None]
                if GRAD_VALUE:
                    # d out / d value[corner] = attention weight * bilinear weight of the corner
                    g = grad_out * attn[:, None]
                    gx0 = g * (1.0 - fx)[:, None]
                    gx1 = g * fx[:, None]
                    g00 = gx0 * (1.0 - fy)[:, None]
                    g10 = gx1 * (1.0 - fy)[:, None]
                    g01 = gx0 * fy[:, None]
                    g11 = gx1 * fy[:, None]
                    # relaxed: only the sums matter, no ordering with other memory accesses
                    tl.atomic_add(grad_value_ptr + off00, g00, mask=m00, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off10, g10, mask=m10, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off01, g01, mask=m01, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + off11, g11, mask=m11, sem="relaxed")
                if GRAD_SAMPLING:
                    # dot products of the output gradient with the corner rows
                    v00 = tl.load(value_ptr + off00, mask=m00, other=0.0).to(tl.float32)
                    v10 = tl.load(value_ptr + off10, mask=m10, other=0.0).to(tl.float32)
                    v01 = tl.load(value_ptr + off01, mask=m01, other=0.0).to(tl.float32)
                    v11 = tl.load(value_ptr + off11, mask=m11, other=0.0).to(tl.float32)
                    dot00 = tl.sum(grad_out * v00, axis=1)
                    dot10 = tl.sum(grad_out * v10, axis=1)
                    dot01 = tl.sum(grad_out * v01, axis=1)
                    dot11 = tl.sum(grad_out * v11, axis=1)
                    top = dot00 * (1.0 - fx) + dot10 * fx
                    bottom = dot01 * (1.0 - fx) + dot11 * fx
                    grad_attn = top * (1.0 - fy) + bottom * fy
                    # x = loc_x * width - 0.5: d/d loc_x = width * d/dx (same for y)
                    grad_x = ((dot10 - dot00) * (1.0 - fy) + (dot11 - dot01) * fy) * attn
                    grad_y = (bottom - top) * attn
                    grad_x = grad_x * width.to(tl.float32)
                    grad_y = grad_y * height.to(tl.float32)
                    tl.store(
                        grad_weight_ptr + weight_offset,
                        grad_attn.to(grad_weight_ptr.dtype.element_ty),
                        mask=q_mask,
                    )
                    loc_ty = grad_loc_ptr.dtype.element_ty
                    tl.store(grad_loc_ptr + weight_offset * 2, grad_x.to(loc_ty), mask=q_mask)
                    tl.store(grad_loc_ptr + weight_offset * 2 + 1, grad_y.to(loc_ty), mask=q_mask)


def _shape_list(value_spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """(H, W) of each level as python ints (a [L, 2] tensor or a list of pairs)."""
    if isinstance(value_spatial_shapes, torch.Tensor):
        value_spatial_shapes = value_spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in value_spatial_shapes]


@functools.lru_cache(maxsize=64)
def _level_table(shapes: Tuple[Tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """int32 [L, 3] (H, W, first position) of each level on ``device``, built once per set of
    shapes (no host-to-device copy per call). Built outside inference mode: the table is saved
    for backward, which a table first made during an inference-mode evaluation could not be."""
    rows, start = [], 0
    for h, w in shapes:
        rows.append((h, w, start))
        start += h * w
    with torch.inference_mode(False):
        return torch.tensor(rows, dtype=torch.int32).to(device)


def _launch_config(num_images: int, num_heads: int, num_queries: int, head_dim: int):
    """(BLOCK_Q, BLOCK_D, number of query blocks, grid)."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(1, min(_MAX_BLOCK_Q, _TILE_ELEMENTS // block_d))
    block_q = min(block_q, triton.next_power_of_2(num_queries))
    query_blocks = triton.cdiv(num_queries, block_q)
    return block_q, block_d, query_blocks, (num_images * num_heads * query_blocks,)


def _on_device(tensor: torch.Tensor):
    """Context making ``tensor``'s GPU the current one (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _MSDeformAttnTritonFunction(torch.autograd.Function):
    """value [N, S, M, D], level table [L, 3], locations [N, Lq, M, L, P, 2], weights
    [N, Lq, M, L, P] (all contiguous) -> [N, Lq, M, D]."""

    @staticmethod
    def forward(ctx, value, levels, locations, weights):
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = locations.shape
        ctx.save_for_backward(value, levels, locations, weights)
        out = value.new_empty(n, lq, m, d)
        if out.numel() == 0:
            return out
        block_q, block_d, query_blocks, grid = _launch_config(n, m, lq, d)
        with _on_device(value):
            _ms_deform_attn_forward_kernel[grid](
                value, levels, locations, weights, out, lq, s, query_blocks,
                NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points,
                BLOCK_Q=block_q, BLOCK_D=block_d,
            )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, levels, locations, weights = ctx.saved_tensors
        need_value, _, need_locations, need_weights = ctx.needs_input_grad
        need_sampling = need_locations or need_weights
        n, s, m, d = value.shape
        _, lq, _, n_levels, n_points, _ = locations.shape
        grad_out = grad_out.contiguous()
        # fp32 accumulation buffer for the atomic adds; the inputs stand in (never written) for
        # the gradients that are not computed
        if need_value:
            grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        else:
            grad_value = value
        if need_sampling:
            grad_locations, grad_weights = torch.zeros_like(locations), torch.zeros_like(weights)
        else:
            grad_locations, grad_weights = locations, weights
        if grad_out.numel() > 0:
            block_q, block_d, query_blocks, grid = _launch_config(n, m, lq, d)
            with _on_device(value):
                _ms_deform_attn_backward_kernel[grid](
                    value, levels, locations, weights, grad_out,
                    grad_value, grad_locations, grad_weights, lq, s, query_blocks,
                    NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points,
                    BLOCK_Q=block_q, BLOCK_D=block_d,
                    GRAD_VALUE=need_value, GRAD_SAMPLING=need_sampling,
                )  # fmt: skip
        return (
            grad_value.to(value.dtype) if need_value else None,
            None,
            grad_locations if need_locations else None,
            grad_weights if need_weights else None,
        )


def ms_deform_attn_triton(
    value: torch.Tensor,
    value_spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with Triton kernels; same arguments, result and
    gradients as ``ms_deform_attn_pytorch`` (computed in fp32, returned in the input dtypes).

    Args:
        value: [N, S, M, D], the flattened maps of all levels (S = sum of H_l * W_l), M heads.
        value_spatial_shapes: [L, 2] (H_l, W_l) per level, as a list of pairs or a tensor (a
            device tensor is read back to the host: pass a list to avoid that sync).
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y); (0, 0) is the top-left corner
            of the top-left pixel (``align_corners=False``); points outside sample zeros.
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * D] in the dtype of ``value``.
    """
    if not triton_available(value.device):
        raise RuntimeError(
            f"ms_deform_attn_triton cannot run on {value.device} tensors (it needs Triton and a "
            "CUDA device, or Triton's interpreter for CPU tensors): check triton_available first"
        )
    shapes = tuple(_shape_list(value_spatial_shapes))
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got shape {tuple(value.shape)}")
    n, s, m, d = value.shape
    if s != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {s} positions, spatial shapes {list(shapes)} another number")
    n_levels = len(shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [N, Lq, M, L, P, 2], "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    lq, n_points = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(sampling_locations.shape[:5]) != (n, lq, m, n_levels, n_points):
        raise ValueError(
            f"sampling_locations shape {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} and {n_levels} levels"
        )
    if tuple(attention_weights.shape) != (n, lq, m, n_levels, n_points):
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} is not "
            f"{(n, lq, m, n_levels, n_points)}"
        )
    for name, tensor in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device}, value on {value.device}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")
    if not value.is_floating_point():
        raise ValueError(f"value must be a float tensor, got {value.dtype}")
    levels = _level_table(shapes, value.device)
    output = _MSDeformAttnTritonFunction.apply(
        value.contiguous(), levels, sampling_locations.contiguous(), attention_weights.contiguous()
    )
    return output.view(n, lq, m * d)
