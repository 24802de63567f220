"""Multi-scale deformable attention for CPU tensors: C++ kernels compiled on first use.

``mask2former/kernels/csrc/deformable_attention_cpu.cpp`` holds the forward and backward kernels,
built with the project's other CPU kernels into one library by :mod:`mask2former.kernels` (on the
first call in a process that does not find it in the kernel cache).

The kernels are wrapped as the operators ``mask2former::ms_deform_attn_cpu`` and its backward
(``torch.library`` custom operators, so ``torch.compile`` keeps them as single calls), with
autograd. Two entry points:

* :func:`ms_deform_attn_cpu_pixels`: sampling pixels and attention weights (what
  :func:`~.deformable_attention.ms_deform_attn_cpu` computes from the normalised locations);
* :func:`ms_deform_attn_cpu_logits`: what :class:`MSDeformAttn` computes from, reference pixels,
  offsets in pixels and attention logits; the kernels add the offsets to the reference and take
  the softmax themselves, so neither the locations nor the weights are materialised.

Both accept float32 and float64 (accumulation in that type) and give the results and gradients
of :func:`~.deformable_attention.ms_deform_attn_pytorch` up to rounding.
"""

import ctypes
import functools
from typing import List, Optional, Sequence, Tuple

import torch

from ...kernels import load_library

__all__ = ["ms_deform_attn_cpu_logits", "ms_deform_attn_cpu_pixels"]

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _DTYPES.values():
        # attribute access caches the function object, so the declarations stick
        forward, backward = (getattr(lib, f"msda_{op}_{suffix}") for op in ("forward", "backward"))
        forward.argtypes = [ptr] * 8 + [i64] * 7 + [i32, i32]
        backward.argtypes = [ptr] * 10 + [i64] * 7 + [i32, i32]
        forward.restype = backward.restype = None
    lib.msda_max_points.restype = i64


@functools.cache
def _library() -> ctypes.CDLL:
    """The kernel library with the argument types of the deformable-attention functions."""
    lib = load_library()
    _declare(lib)
    return lib


# ------------------------------------------------------------------------------------ operators
def _geometry(shapes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[L, 2] int64 (H, W) and [L] int64 level starts from the flat (H0, W0, H1, W1, ...)."""
    hw = torch.tensor(shapes, dtype=torch.int64).view(-1, 2)
    sizes = hw[:, 0] * hw[:, 1]
    return hw, torch.cumsum(sizes, 0) - sizes


def _check(value, ref, offset, logits, shapes: Sequence[int]) -> Tuple[int, ...]:
    """(N, S, M, D, Lq, L, P) after checking devices, dtypes and shapes."""
    if value.dtype not in _DTYPES:
        raise TypeError(f"the CPU kernels take float32 or float64 tensors, got {value.dtype}")
    tensors = {"value": value, "offset": offset, "logits": logits}
    if ref is not None:
        tensors["ref"] = ref
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernels take CPU tensors, {name} is on {t.device}")
        if t.dtype != value.dtype:
            raise TypeError(f"{name} is {t.dtype}, value is {value.dtype}")
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = offset.shape
    if len(shapes) != 2 * n_levels:
        raise ValueError(f"{len(shapes) // 2} level shapes for {n_levels} levels")
    if s != sum(shapes[0::2][i] * shapes[1::2][i] for i in range(n_levels)):
        raise ValueError(f"value has {s} positions, the level shapes {shapes} another number")
    if offset.shape != (n, lq, m, n_levels, n_points, 2):
        raise ValueError(f"offset {tuple(offset.shape)} does not match value {tuple(value.shape)}")
    if logits.shape != (n, lq, m, n_levels * n_points):
        expected = (n, lq, m, n_levels * n_points)
        raise ValueError(f"logits {tuple(logits.shape)}, expected {expected}")
    if ref is not None and ref.shape != (n, lq, n_levels, 2):
        raise ValueError(f"ref {tuple(ref.shape)}, expected {(n, lq, n_levels, 2)}")
    if n_levels * n_points > _library().msda_max_points():
        raise ValueError(f"{n_levels * n_points} points per query and head: too many")
    return n, s, m, d, lq, n_levels, n_points


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


@torch.library.custom_op("mask2former::ms_deform_attn_cpu", mutates_args=())
def _forward_op(
    value: torch.Tensor,
    ref: Optional[torch.Tensor],
    offset: torch.Tensor,
    logits: torch.Tensor,
    shapes: List[int],
    softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [N, Lq, M, D], the softmax of the logits, or an empty tensor without ``softmax``)."""
    value, offset, logits = value.contiguous(), offset.contiguous(), logits.contiguous()
    ref = None if ref is None else ref.contiguous()
    dims = _check(value, ref, offset, logits, shapes)
    n, _, m, d, lq, _, _ = dims
    hw, starts = _geometry(shapes)
    out = value.new_empty(n, lq, m, d)
    weights = torch.empty_like(logits) if softmax else logits.new_empty(0)
    getattr(_library(), f"msda_forward_{_DTYPES[value.dtype]}")(
        value.data_ptr(), hw.data_ptr(), starts.data_ptr(), _ptr(ref), offset.data_ptr(),
        logits.data_ptr(), out.data_ptr(), weights.data_ptr() if softmax else None, *dims,
        int(softmax), torch.get_num_threads(),
    )  # fmt: skip
    return out, weights


@_forward_op.register_fake
def _(value, ref, offset, logits, shapes, softmax):
    n, _, m, d = value.shape
    weights = torch.empty_like(logits) if softmax else logits.new_empty(0)
    return value.new_empty(n, offset.shape[1], m, d), weights


@torch.library.custom_op("mask2former::ms_deform_attn_cpu_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    ref: Optional[torch.Tensor],
    offset: torch.Tensor,
    weights: torch.Tensor,
    shapes: List[int],
    softmax: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, offset and the logits (of the weights without ``softmax``), from the
    attention weights."""
    value, offset, weights = value.contiguous(), offset.contiguous(), weights.contiguous()
    ref = None if ref is None else ref.contiguous()
    grad_out = grad_out.to(value.dtype).contiguous()
    dims = _check(value, ref, offset, weights, shapes)
    hw, starts = _geometry(shapes)
    grad_value = torch.zeros_like(value)
    grad_offset, grad_logits = torch.empty_like(offset), torch.empty_like(weights)
    getattr(_library(), f"msda_backward_{_DTYPES[value.dtype]}")(
        value.data_ptr(), hw.data_ptr(), starts.data_ptr(), _ptr(ref), offset.data_ptr(),
        weights.data_ptr(), grad_out.data_ptr(), grad_value.data_ptr(), grad_offset.data_ptr(),
        grad_logits.data_ptr(), *dims, int(softmax), torch.get_num_threads(),
    )  # fmt: skip
    return grad_value, grad_offset, grad_logits


@_backward_op.register_fake
def _(grad_out, value, ref, offset, weights, shapes, softmax):
    return torch.empty_like(value), torch.empty_like(offset), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    value, ref, offset, logits, shapes, softmax = inputs
    # the backward needs the attention weights: the forward's softmax, or the given weights
    ctx.save_for_backward(value, ref, offset, output[1] if softmax else logits)
    ctx.shapes, ctx.softmax = shapes, softmax
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_weights):
    value, ref, offset, weights = ctx.saved_tensors
    grad_value, grad_offset, grad_logits = _backward_op(
        grad_out, value, ref, offset, weights, ctx.shapes, ctx.softmax
    )
    grad_ref = None
    if ref is not None and ctx.needs_input_grad[1]:
        # the sampling pixel is ref + offset: every head and point of a level moves with ref
        grad_ref = grad_offset.sum(dim=(2, 4))
    return grad_value, grad_ref, grad_offset, grad_logits, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _flat_shapes(shapes: Sequence[Tuple[int, int]]) -> List[int]:
    return [int(x) for hw in shapes for x in hw]


def ms_deform_attn_cpu_logits(
    value: torch.Tensor,
    shapes: Sequence[Tuple[int, int]],
    ref_pixel: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention from pixel geometry and logits.

    Args:
        value: [N, S, M, D] float32 or float64 CPU tensor.
        shapes: (H, W) per level, Python ints.
        ref_pixel: [N, Lq, L, 2] reference (x, y) per level in pixels of that level (pixel
            centres at integers: ``reference * size - 0.5`` for a normalised reference).
        offsets: [N, Lq, M, L, P, 2] sampling offsets in pixels, added to the reference.
        logits: [N, Lq, M, L * P] attention logits (softmax over the L * P points).

    Returns:
        [N, Lq, M * D].
    """
    n, _, m, d = value.shape
    out, _ = _forward_op(value, ref_pixel, offsets, logits, _flat_shapes(shapes), True)
    return out.view(n, -1, m * d)


def ms_deform_attn_cpu_pixels(
    value: torch.Tensor,
    shapes: Sequence[Tuple[int, int]],
    pixel: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention from sampling pixels and attention weights.

    Args:
        value: [N, S, M, D] float32 or float64 CPU tensor.
        shapes: (H, W) per level, Python ints.
        pixel: [N, Lq, M, L, P, 2] sampling (x, y) in pixels of their level (pixel centres at
            integers).
        weights: [N, Lq, M, L, P] attention weights.

    Returns:
        [N, Lq, M * D].
    """
    n, lq, m, n_levels, n_points, _ = pixel.shape
    weights = weights.reshape(n, lq, m, n_levels * n_points)
    out, _ = _forward_op(value, None, pixel, weights, _flat_shapes(shapes), False)
    return out.view(n, lq, -1)
