"""Argument checks and the default attention scale shared by every implementation."""

from typing import Optional


def check_inputs(query, key, value, rpb, kernel_size: int, dilation: int) -> None:
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


def default_scale(query, scale: Optional[float]) -> float:
    return query.shape[-1] ** -0.5 if scale is None else scale
