"""NATTEN's fused ``natten.functional.na2d`` (NATTEN >= 0.20; no relative positional bias)."""

import torch

from .checks import check_inputs, default_scale


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
    check_inputs(query, key, value, rpb, kernel_size, dilation)
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
        scale=default_scale(query, scale),
    )
