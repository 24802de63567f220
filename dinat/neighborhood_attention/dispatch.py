"""Choosing the implementation (``MODEL.DINAT.ATTENTION_IMPL``) and calling it."""

import logging

import torch

from .flex import flex_variant, na2d_flex
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
# Flex configurations that passed their first compiled forward (+ backward) / that failed it.
_FLEX_PROBED = set()
_FLEX_FAILED = {}


def check_impl_name(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"Unknown neighborhood attention implementation {impl!r}; one of {ATTENTION_IMPLS}."
        )


# (torch.compile takes the answer as a constant of the graph: tracing the logging of a new
# choice would split the graph at every call)
@torch.compiler.assume_constant_result
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


def _probe_flex(query, key, value, rpb, kernel_size, dilation, scale, flex_fn):
    """One forward (and, when gradients flow, backward) of ``flex_fn`` on detached copies, so that
    a kernel that does not compile (e.g. the fp32 backward exceeding the shared memory of GPUs
    with about 100 KB per block) fails here, where it can be handled, and not in
    ``loss.backward()``. The compiled kernels are cached: the real call compiles nothing more."""

    def copy(t):
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    q, k, v, b = (copy(t) for t in (query, key, value, rpb))
    out = flex_fn(q, k, v, b, kernel_size, dilation, scale)
    if out.requires_grad:
        out.float().sum().backward()


def _na2d_auto_flex(query, key, value, rpb, kernel_size, dilation, scale, flex_fn=na2d_flex):
    """Flex attention chosen by "auto": a configuration whose compilation fails falls back to the
    tiled implementation (same numbers), with a warning naming the error."""
    variant = flex_variant(query, rpb, kernel_size, dilation)
    if variant not in _FLEX_FAILED and variant not in _FLEX_PROBED:
        try:
            _probe_flex(query, key, value, rpb, kernel_size, dilation, scale, flex_fn)
            _FLEX_PROBED.add(variant)
        except Exception as e:  # any compiler / kernel-resource error: the tiled path still works
            _FLEX_FAILED[variant] = f"{type(e).__name__}: {e}"
            logger.warning(
                "Neighborhood attention: compiled flex attention failed for %s (%s); using the "
                "'tiled' implementation for it (same numbers, more memory traffic). Set "
                "MODEL.DINAT.ATTENTION_IMPL to choose explicitly.",
                variant,
                _FLEX_FAILED[variant].splitlines()[0][:300],
            )
    if variant in _FLEX_FAILED:
        return na2d_tiled(query, key, value, rpb, kernel_size, dilation, scale)
    return flex_fn(query, key, value, rpb, kernel_size, dilation, scale)


def na2d(query, key, value, rpb, kernel_size: int, dilation=1, scale=None, impl: str = "auto"):
    """Neighborhood attention with the implementation chosen by :func:`resolve_attention_impl`.

    With ``impl="auto"`` on CUDA, a flex configuration that does not compile falls back to
    ``tiled`` with a warning (:func:`_na2d_auto_flex`); an explicitly requested implementation
    raises its own errors.
    """
    resolved = resolve_attention_impl(impl, query.device, rpb is not None)
    if impl == "auto" and resolved == "flex":
        return _na2d_auto_flex(query, key, value, rpb, kernel_size, dilation, scale)
    return _IMPL_FNS[resolved](query, key, value, rpb, kernel_size, dilation, scale)
