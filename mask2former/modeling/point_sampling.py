"""Bilinear sampling helpers of Mask2Former.

* Point sampling of PointRend (Kirillov et al., 2020), used by the matcher and the losses. Point
  coordinates are normalised to [0, 1] x [0, 1] over the whole map, (x, y) order, with
  ``align_corners=False`` semantics: (0, 0) is the top-left corner of the top-left pixel.
* Bilinear resizing (``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing) as
  products with 1-D resize matrices: the same values, much faster on CPU for downsampling, and
  composable (crop, resize twice) into one product.
"""

import functools
from typing import Callable, Sequence

import torch
from torch.nn import functional as F


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """
    Bilinearly sample ``input`` at ``point_coords`` (a wrapper of ``F.grid_sample`` taking [0, 1]
    coordinates).

    Args:
        input: [N, C, H, W] maps.
        point_coords: [N, P, 2] or [N, Hg, Wg, 2] (x, y) coordinates in [0, 1].
        kwargs: passed to ``F.grid_sample`` (e.g. ``align_corners=False``, the default here).

    Returns:
        [N, C, P] or [N, C, Hg, Wg] sampled values, float32 for half precision ``input``.
    """
    kwargs.setdefault("align_corners", False)
    squeeze = point_coords.dim() == 3
    if squeeze:
        point_coords = point_coords.unsqueeze(2)
    # Sampled in float32 (float64 for float64 maps), as the official code under autocast: half
    # precision coordinates would move the points by up to 2**-11 (fp16) or 2**-8 (bf16) of the
    # map, and half precision maps (AMP mask logits) give float32 point values for the losses.
    dtype = torch.promote_types(input.dtype, torch.float32)
    grid = 2.0 * point_coords.to(dtype) - 1.0
    output = F.grid_sample(input.to(dtype), grid, **kwargs)
    return output.squeeze(3) if squeeze else output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits [R, 1, ...]: ``-|logits|`` (highest at 0)."""
    if logits.shape[1] != 1:
        raise ValueError(f"expected class-agnostic logits [R, 1, ...], got {tuple(logits.shape)}")
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    coarse_logits: torch.Tensor,
    uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """
    PointRend's training-time point selection: draw ``int(num_points * oversample_ratio)``
    uniform random points per map, keep the ``int(importance_sample_ratio * num_points)`` most
    uncertain of them (uncertainty evaluated on the bilinearly sampled logits), and fill up to
    ``num_points`` with fresh uniform random points.

    Args:
        coarse_logits: [R, C, H, W] logits (C = 1 for class-agnostic masks).
        uncertainty_func: maps sampled logits [R, C, P] to uncertainties [R, 1, P].
        num_points: points per map.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].

    Returns:
        [R, num_points, 2] coordinates in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_maps = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(num_maps, num_sampled, 2, device=device)
    uncertainties = uncertainty_func(point_sample(coarse_logits, candidates))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    # the order of the selected points is irrelevant: skip sorting them (about 2x faster)
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1, sorted=False).indices
    point_coords = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_maps, num_random, 2, device=device)], dim=1
        )
    return point_coords


def bilinear_resize_matrix(
    in_size: int, out_size: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """
    The [out_size, in_size] matrix of 1-D linear resizing with ``align_corners=False`` (the
    per-axis operation of ``F.interpolate(mode="bilinear")``): row i holds the two weights of
    output i, computed as PyTorch does (source = (i + 0.5) * in / out - 0.5, clamped at 0, in
    float64 for float64 and in float32 for other dtypes).

    The matrix is built once per (sizes, device, dtype) and the same tensor is returned again
    afterwards (building it on the host and copying it to a GPU is a blocking transfer): callers
    must not modify it in place.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_resize_matrix(int(in_size), int(out_size), device, dtype)


@functools.lru_cache(maxsize=32)
def _cached_resize_matrix(
    in_size: int, out_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Outside inference mode: a matrix first made during an inference-mode evaluation may later
    # be saved for backward by a training step.
    with torch.inference_mode(False):
        return _build_resize_matrix(in_size, out_size, dtype).to(device=device, dtype=dtype)


def _build_resize_matrix(in_size: int, out_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The matrix of :func:`bilinear_resize_matrix`, on the host, in its compute dtype."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(in_size, dtype=compute) / out_size
    src = ((torch.arange(out_size, dtype=compute) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lambda1 = (src - i0).clamp(0, 1)
    matrix = torch.zeros(out_size, in_size, dtype=compute)
    matrix.scatter_add_(1, i0[:, None], (1 - lambda1)[:, None])
    matrix.scatter_add_(1, i1[:, None], lambda1[:, None])
    return matrix


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """
    ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for [..., H, W] tensors,
    computed as two matrix products (equal up to float rounding).
    """
    height, width = x.shape[-2:]
    rows = bilinear_resize_matrix(height, int(size[0]), x.device, x.dtype)
    cols = bilinear_resize_matrix(width, int(size[1]), x.device, x.dtype)
    return rows @ (x @ cols.t())
