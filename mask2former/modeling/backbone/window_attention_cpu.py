"""Swin's (shifted-)window attention for CPU tensors: C++ kernels compiled on first use.

``mask2former/kernels/csrc/window_attention_cpu.cpp`` holds the forward and backward kernels,
built with the project's other CPU kernels into one library by :mod:`mask2former.kernels`.

The kernels take the q, k, v projections of the tokens in map order and the window layout's slot
index, so the zero padding, the cyclic shift and the window partition (and their inverses) are
never materialised, and the projections are never computed for padding tokens: a padding token's
q, k, v are the projection of zeros, the qkv bias (``pad``). Softmax, relative position bias and
shift mask are applied inside the kernel, per window and head, in cache.

They are wrapped as the operators ``mask2former::window_attention_cpu`` and its backward
(``torch.library`` custom operators, so ``torch.compile`` keeps them as single calls), with
autograd for ``qkv``, ``pad`` and ``bias``. Float32 and float64 (accumulation in that type), and
bfloat16 without gradients (``MODEL.PRECISION bf16`` inference: accumulation in float32, the
output rounded to bfloat16).
"""

import ctypes
import functools
from typing import Optional, Tuple

import torch

from ...kernels import load_library

__all__ = ["window_attention_cpu"]

_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
# Types of qkv with a forward kernel (bfloat16: forward only).
_FORWARD_DTYPES = {**_DTYPES, torch.bfloat16: "bf16"}


@functools.cache
def _library() -> ctypes.CDLL:
    """The kernel library with the argument types of the window-attention functions."""
    lib = load_library()
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for suffix in _DTYPES.values():
        forward = getattr(lib, f"window_attention_forward_{suffix}")
        backward = getattr(lib, f"window_attention_backward_{suffix}")
        forward.argtypes = [ptr] * 7 + [i64] * 6 + [f64, i32]
        backward.argtypes = [ptr] * 8 + [i64] * 6 + [f64, i32]
        forward.restype = backward.restype = None
    lib.window_attention_forward_bf16.argtypes = [ptr] * 6 + [i64] * 6 + [f64, i32]
    lib.window_attention_forward_bf16.restype = None
    return lib


def _check(qkv, pad, index, bias, mask) -> Tuple[int, ...]:
    """(B, L, nW, N, H, D) after checking devices, dtypes and shapes."""
    if qkv.dtype not in _FORWARD_DTYPES:
        raise TypeError(
            f"the CPU kernels take float32, float64 or bfloat16 tensors, got {qkv.dtype}"
        )
    tensors = {"qkv": qkv, "pad": pad, "bias": bias}
    if mask is not None:
        tensors["mask"] = mask
    for name, t in {**tensors, "index": index}.items():
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernels take CPU tensors, {name} is on {t.device}")
    for name, t in tensors.items():
        if t.dtype != qkv.dtype:
            raise TypeError(f"{name} is {t.dtype}, qkv is {qkv.dtype}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"index must be a 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, L, 3, H, D], got {tuple(qkv.shape)}")
    b, length, _, heads, dim = qkv.shape
    if pad.shape != (3, heads, dim):
        raise ValueError(f"pad {tuple(pad.shape)}, expected {(3, heads, dim)}")
    if bias.dim() != 3 or bias.shape[0] != heads or bias.shape[1] != bias.shape[2]:
        raise ValueError(f"bias must be [H, N, N] with H = {heads}, got {tuple(bias.shape)}")
    n = bias.shape[1]
    if index.numel() % n:
        raise ValueError(f"index has {index.numel()} slots, not whole windows of {n}")
    windows = index.numel() // n
    if mask is not None and mask.shape != (windows, n, n):
        raise ValueError(f"mask {tuple(mask.shape)}, expected {(windows, n, n)}")
    return b, length, windows, n, heads, dim


@torch.library.custom_op("mask2former::window_attention_cpu", mutates_args=())
def _forward_op(
    qkv: torch.Tensor,
    pad: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    keep_probs: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, L, H, D], the softmax [B, nW, H, N, N] if ``keep_probs`` else an empty tensor).
    For bfloat16 ``qkv`` (no softmax kept), pad, bias and mask go to the kernel as float32."""
    qkv, pad, index, bias = (t.contiguous() for t in (qkv, pad, index, bias))
    mask = None if mask is None else mask.contiguous()
    dims = _check(qkv, pad, index, bias, mask)
    b, length, windows, n, heads, dim = dims
    out = qkv.new_empty(b, length, heads, dim)
    if qkv.dtype == torch.bfloat16:
        if keep_probs:
            raise ValueError("the bfloat16 window attention has no backward (float32 training)")
        pad, bias = pad.float(), bias.float()
        mask = None if mask is None else mask.float()
        _library().window_attention_forward_bf16(
            qkv.data_ptr(), pad.data_ptr(), index.data_ptr(), bias.data_ptr(),
            None if mask is None else mask.data_ptr(), out.data_ptr(), *dims, float(scale),
            torch.get_num_threads(),
        )  # fmt: skip
        return out, qkv.new_empty(0)
    probs = qkv.new_empty(b, windows, heads, n, n) if keep_probs else qkv.new_empty(0)
    getattr(_library(), f"window_attention_forward_{_DTYPES[qkv.dtype]}")(
        qkv.data_ptr(), pad.data_ptr(), index.data_ptr(), bias.data_ptr(),
        None if mask is None else mask.data_ptr(), out.data_ptr(),
        probs.data_ptr() if keep_probs else None, *dims, float(scale), torch.get_num_threads(),
    )  # fmt: skip
    return out, probs


@_forward_op.register_fake
def _(qkv, pad, index, bias, mask, scale, keep_probs):
    b, length, _, heads, dim = qkv.shape
    n = bias.shape[1]
    probs = qkv.new_empty(b, index.numel() // n, heads, n, n) if keep_probs else qkv.new_empty(0)
    return qkv.new_empty(b, length, heads, dim), probs


@torch.library.custom_op("mask2former::window_attention_cpu_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    pad: torch.Tensor,
    index: torch.Tensor,
    probs: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of qkv, pad and bias, from the forward's softmax."""
    qkv, pad, index, probs = (t.contiguous() for t in (qkv, pad, index, probs))
    grad_out = grad_out.to(qkv.dtype).contiguous()
    b, length, _, heads, dim = qkv.shape
    n = probs.shape[-1]
    windows = index.numel() // n
    if probs.shape != (b, windows, heads, n, n) or grad_out.shape != (b, length, heads, dim):
        raise ValueError(
            f"probs {tuple(probs.shape)} / grad_out {tuple(grad_out.shape)} do not match qkv "
            f"{tuple(qkv.shape)} and {windows} windows of {n}"
        )
    grad_qkv = torch.empty_like(qkv)  # every token's rows are written (one slot each)
    grad_pad = torch.empty_like(pad)
    grad_bias = qkv.new_empty(heads, n, n)
    getattr(_library(), f"window_attention_backward_{_DTYPES[qkv.dtype]}")(
        grad_out.data_ptr(), qkv.data_ptr(), pad.data_ptr(), index.data_ptr(), probs.data_ptr(),
        grad_qkv.data_ptr(), grad_pad.data_ptr(), grad_bias.data_ptr(),
        b, length, windows, n, heads, dim, float(scale), torch.get_num_threads(),
    )  # fmt: skip
    return grad_qkv, grad_pad, grad_bias


@_backward_op.register_fake
def _(grad_out, qkv, pad, index, probs, scale):
    heads, n = qkv.shape[3], probs.shape[-1]
    return torch.empty_like(qkv), torch.empty_like(pad), qkv.new_empty(heads, n, n)


def _setup_context(ctx, inputs, output):
    qkv, pad, index, _, _, scale, keep_probs = inputs
    if not keep_probs:
        raise RuntimeError("window_attention_cpu: the softmax was not kept for the backward")
    ctx.save_for_backward(qkv, pad, index, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_probs):
    qkv, pad, index, probs = ctx.saved_tensors
    grad_qkv, grad_pad, grad_bias = _backward_op(grad_out, qkv, pad, index, probs, ctx.scale)
    return grad_qkv, grad_pad, None, grad_bias, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def window_attention_cpu(
    qkv: torch.Tensor,
    pad: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """(Shifted-)window multi-head self-attention over tokens in map order.

    Args:
        qkv: [B, L, 3, H, D] q, k, v of the L tokens of each image (CPU; float32 or float64, or
            bfloat16 without gradients).
        pad: [3, H, D] q, k, v of a padding token (the qkv projection's bias, or zeros), in
            ``qkv``'s dtype, as are ``bias`` and ``mask``.
        index: [nW * N] int64: the token of each window slot (windows row-major, tokens
            row-major inside a window), L for padding (``WindowLayout.partition_index``).
        bias: [H, N, N] relative position bias.
        mask: [nW, N, N] additive shift mask, or None.
        scale: q is multiplied by it before the product with k.

    Returns:
        [B, L, H * D]: the attention output of every token (padding slots' outputs dropped).
        Differentiable with respect to ``qkv``, ``pad`` and ``bias``.
    """
    keep_probs = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, pad, bias))
    out, _ = _forward_op(qkv, pad, index, bias, mask, float(scale), keep_probs)
    return out.flatten(2)
