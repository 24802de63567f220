"""Point sampling of PointRend (Kirillov et al., 2020), used by the Mask2Former matcher and losses.

Point coordinates are normalised to [0, 1] x [0, 1] over the whole map, (x, y) order, with
``align_corners=False`` semantics: (0, 0) is the top-left corner of the top-left pixel.
"""
from typing import Callable

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
        [N, C, P] or [N, C, Hg, Wg] sampled values.
    """
    kwargs.setdefault("align_corners", False)
    squeeze = point_coords.dim() == 3
    if squeeze:
        point_coords = point_coords.unsqueeze(2)
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    output = F.grid_sample(input, grid, **kwargs)
    return output.squeeze(3) if squeeze else output


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of class-agnostic mask logits [R, 1, ...]: ``-|logits|`` (0 is most uncertain)."""
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
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_maps = coarse_logits.shape[0]
    device = coarse_logits.device
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(num_maps, num_sampled, 2, device=device)
    uncertainties = uncertainty_func(point_sample(coarse_logits, candidates))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1).indices
    point_coords = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_maps, num_random, 2, device=device)], dim=1
        )
    return point_coords
