"""Tests of mask2former.modeling.point_sampling against brute-force float64 references."""

import math

import pytest
import torch
from torch.nn import functional as F

from mask2former.modeling.point_sampling import (
    bilinear_resize_matrix,
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    resize_bilinear,
)


def bilinear_reference(image, x, y):
    """Value of a [H, W] map at normalised (x, y) in [0, 1]: pixel centres at (i + 0.5) / size,
    bilinear interpolation, zeros outside the map (grid_sample, align_corners=False)."""
    height, width = image.shape
    px = x * width - 0.5
    py = y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * float(image[yy, xx])
    return total


def test_point_sample_matches_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=g, dtype=torch.float64)
    coords[0, 0] = torch.tensor([0.0, 0.0])  # corners: half-weight zero padding
    coords[0, 1] = torch.tensor([1.0, 1.0])
    coords[1, 2] = torch.tensor([0.5 / 7, 2.5 / 5], dtype=torch.float64)  # exactly a pixel centre
    out = point_sample(maps, coords)
    assert out.shape == (2, 3, 11)
    for n in range(2):
        for c in range(3):
            for p in range(11):
                x, y = coords[n, p].tolist()
                ref = bilinear_reference(maps[n, c], x, y)
                assert out[n, c, p].item() == pytest.approx(ref, abs=1e-12)
    assert out[1, :, 2].tolist() == pytest.approx(maps[1, :, 2, 0].tolist(), abs=1e-12)


def test_point_sample_grid_coords_cast_to_input_dtype():
    maps = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    # pixel centres of row 1 as a [1, 1, 4, 2] grid
    grid = torch.stack([(torch.arange(4) + 0.5) / 4, torch.full((4,), 1.5 / 3)], dim=-1).view(
        1, 1, 4, 2
    )
    out = point_sample(maps, grid.double())
    assert out.shape == (1, 1, 1, 4)
    assert out.flatten().tolist() == pytest.approx([4.0, 5.0, 6.0, 7.0], abs=1e-5)


def test_calculate_uncertainty():
    logits = torch.tensor([[[-2.0, 0.0, 3.0]]])
    assert calculate_uncertainty(logits).tolist() == [[[-2.0, 0.0, -3.0]]]
    with pytest.raises(ValueError):
        calculate_uncertainty(torch.zeros(1, 2, 3))


def _uncertainty_reference(logit_map, coords):
    return [-abs(bilinear_reference(logit_map, x, y)) for x, y in coords.tolist()]


@pytest.mark.parametrize("importance", [1.0, 0.75, 0.0])
def test_uncertain_points_follow_pointrend_semantics(importance):
    num_points, oversample = 16, 3.0
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 6, 6, generator=g)

    torch.manual_seed(123)
    coords = get_uncertain_point_coords_with_randomness(
        logits, calculate_uncertainty, num_points, oversample, importance
    )
    assert coords.shape == (3, num_points, 2)
    assert coords.min() >= 0 and coords.max() <= 1

    # replay the random draws: candidates first, then the fresh uniform points
    torch.manual_seed(123)
    num_sampled = int(num_points * oversample)
    candidates = torch.rand(3, num_sampled, 2)
    num_uncertain = int(importance * num_points)
    fresh = torch.rand(3, num_points - num_uncertain, 2)
    for r in range(3):
        unc = _uncertainty_reference(logits[r, 0].double(), candidates[r].double())
        order = sorted(range(num_sampled), key=lambda i: -unc[i])
        expected_top = candidates[r, order[:num_uncertain]]
        chosen = coords[r, :num_uncertain]
        # same set of points (topk order between exact ties is unspecified)
        assert sorted(map(tuple, chosen.tolist())) == sorted(map(tuple, expected_top.tolist()))
        assert torch.equal(coords[r, num_uncertain:], fresh[r])


def test_uncertain_points_concentrate_on_the_boundary():
    # logits = x - 0.5 scaled: the decision boundary is the vertical line x = 0.5
    width = 32
    xs = (torch.arange(width) + 0.5) / width
    logits = (10 * (xs - 0.5)).view(1, 1, 1, width).expand(1, 1, width, width).contiguous()
    torch.manual_seed(0)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 64, 3.0, 1.0)
    torch.manual_seed(0)
    candidates = torch.rand(1, 192, 2)
    distance = (coords[0, :, 0] - 0.5).abs()
    candidate_distance = (candidates[0, :, 0] - 0.5).abs()
    # the chosen third of the candidates lie near the boundary (apart from a few points in the
    # half-pixel border strip, where zero padding also pulls the sampled logits towards 0)
    assert (distance < 0.2).float().mean() >= 0.85
    assert distance.mean() < 0.4 * candidate_distance.mean()


def test_invalid_ratios_raise():
    logits = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 4, 0.5, 0.5)
    with pytest.raises(ValueError):
        get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 4, 2.0, 1.5)


@pytest.mark.parametrize("in_size, out_size", [(4, 16), (5, 7), (16, 4), (13, 5), (6, 6), (1, 3)])
def test_bilinear_resize_matrix_matches_interpolate(in_size, out_size):
    matrix = bilinear_resize_matrix(in_size, out_size, dtype=torch.float64)
    assert matrix.shape == (out_size, in_size)
    # column j = response to a unit impulse at input j
    impulses = torch.eye(in_size, dtype=torch.float64)[:, None, :]
    expected = F.interpolate(impulses, size=out_size, mode="linear", align_corners=False)[:, 0].t()
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(matrix.sum(1), torch.ones(out_size, dtype=torch.float64))
    assert ((matrix != 0).sum(1) <= 2).all()


@pytest.mark.parametrize("size", [(16, 20), (3, 5), (8, 9)])
def test_resize_bilinear_matches_interpolate(size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = resize_bilinear(x, size)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
