"""Choosing the implementation (``MODEL.DINAT.ATTENTION_IMPL``) and calling it."""

import logging

import torch

from .flex import na2d_flex
from .natten_fused import na2d_natten, natten_fused_available
from .reference import na2d_reference
from .tiled import na2d_tiled

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "reference", "tiled", "flex", "natten")


_IMPL_FNS = {
    "reference": na2d_reference,
    "tiled": na2d_tiled,
    "flex": na2d_flex,
    "natten": na2d_natten,
}
_LOGGED_CHOICES = set()


def check_impl_name(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"Unknown neighborhood attention implementation {impl!r}; one of {ATTENTION_IMPLS}."
        )


def resolve_attention_impl(impl: str, device, has_rpb: bool) -> str:
    """Concrete implementation for ``impl`` on ``device``; logs each new choice once.

    ``"auto"``: NATTEN's fused kernel when there is no rpb and NATTEN has its compiled library on
    this (CUDA) device; else flex attention on CUDA; else the tiled path.
    """
    check_impl_name(impl)
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
