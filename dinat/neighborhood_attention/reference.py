"""Brute-force neighborhood attention over explicitly built neighbour indices: the ground truth
of the tests (memory ``O(H * W * k^2 * head_dim)``)."""

import functools
from typing import Tuple

import torch

from .checks import check_inputs, default_scale


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


@functools.lru_cache(maxsize=32)
def _device_neighbors_1d(
    length: int, kernel_size: int, dilation: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_neighbors_1d` on ``device``, copied there once per geometry (outside inference
    mode, so that autograd can use them later)."""
    with torch.inference_mode(False):
        keys, bias_index = _neighbors_1d(length, kernel_size, dilation)
        return keys.to(device), bias_index.to(device)


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
    check_inputs(query, key, value, rpb, kernel_size, dilation)
    _, height, width, _, _ = query.shape
    device = query.device
    keys_h, bias_h = _device_neighbors_1d(height, kernel_size, dilation, device)
    keys_w, bias_w = _device_neighbors_1d(width, kernel_size, dilation, device)
    rows = keys_h[:, None, :, None]  # [H, 1, k, 1]
    cols = keys_w[None, :, None, :]  # [1, W, 1, k]
    k_nb = key[:, rows, cols]  # [B, H, W, k, k, heads, D]
    v_nb = value[:, rows, cols]
    logits = torch.einsum("bijnc,bijxync->bijnxy", query * default_scale(query, scale), k_nb)
    if rpb is not None:
        bias = rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]  # [heads, H, W, k, k]
        logits = logits + bias.permute(1, 2, 0, 3, 4).to(logits.dtype)
    attn = logits.flatten(-2).softmax(dim=-1).view_as(logits)
    return torch.einsum("bijnxy,bijxync->bijnc", attn, v_nb)
