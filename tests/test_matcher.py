"""Tests of the Hungarian matcher: cost terms by explicit float64 loops, assignment against
brute force over all assignments, and the compiled CPU kernel of the mask costs (the default on
CPU) against a float64 reference and the PyTorch path."""

import itertools
import math

import pytest
import torch

from mask2former.modeling import matcher as matcher_module
from mask2former.modeling.matcher import HungarianMatcher, mask_costs
from mask2former.modeling.point_sampling import point_sample

NUM_POINTS = 50


def explicit_cost(pred_logits, pred_masks, labels, masks, coords, weights):
    """[Q, T] cost by loops in float64 from the point values at ``coords`` ([1, P, 2])."""
    w_class, w_mask, w_dice = weights
    pred_points = point_sample(pred_masks[None].double(), coords.double())[0]
    tgt_points = point_sample(masks[None].double(), coords.double())[0]
    num_q, num_t, num_p = pred_logits.shape[0], labels.shape[0], coords.shape[1]
    cost = [[0.0] * num_t for _ in range(num_q)]
    for q in range(num_q):
        logits = pred_logits[q].double().tolist()
        norm = sum(math.exp(v) for v in logits)
        for t in range(num_t):
            prob = math.exp(logits[int(labels[t])]) / norm
            bce, inter, psum, tsum = 0.0, 0.0, 0.0, 0.0
            for p in range(num_p):
                x = pred_points[q, p].item()
                y = tgt_points[t, p].item()
                s = 1 / (1 + math.exp(-x))
                bce += -(y * math.log(s) + (1 - y) * math.log(1 - s))
                inter += s * y
                psum += s
                tsum += y
            dice = 1 - (2 * inter + 1) / (psum + tsum + 1)
            cost[q][t] = w_class * -prob + w_mask * bce / num_p + w_dice * dice
    return cost


def brute_force_min(cost):
    """Minimum total cost over all injective maps targets -> queries (targets <= queries)."""
    num_q, num_t = len(cost), len(cost[0])
    best = None
    for queries in itertools.permutations(range(num_q), num_t):
        total = sum(cost[q][t] for t, q in enumerate(queries))
        if best is None or total < best[0]:
            best = (total, queries)
    return best


def random_image(g, num_queries, num_targets, num_classes=4, pred_hw=(6, 5), tgt_hw=(12, 10)):
    pred_logits = torch.randn(num_queries, num_classes + 1, generator=g) * 2
    pred_masks = torch.randn(num_queries, *pred_hw, generator=g) * 3
    labels = torch.randperm(num_classes, generator=g)[:num_targets]
    masks = torch.rand(num_targets, *tgt_hw, generator=g) > 0.5
    return pred_logits, pred_masks, labels, masks


@pytest.mark.parametrize(
    "seed, weights", [(0, (1.0, 1.0, 1.0)), (1, (2.0, 5.0, 5.0)), (2, (0.0, 0.0, 1.0))]
)
def test_matching_is_optimal_and_costs_match_explicit_loops(seed, weights):
    g = torch.Generator().manual_seed(seed)
    num_queries = 5
    images = [random_image(g, num_queries, t) for t in (3, 0, 4)]
    outputs = {
        "pred_logits": torch.stack([im[0] for im in images]),
        "pred_masks": torch.stack([im[1] for im in images]),
    }
    targets = [{"labels": im[2], "masks": im[3]} for im in images]
    matcher = HungarianMatcher(*weights, num_points=NUM_POINTS)

    # the matcher draws one [1, P, 2] set of points per image that has targets, in order
    torch.manual_seed(7)
    coords = [torch.rand(1, NUM_POINTS, 2) for im in images if len(im[2]) > 0]
    torch.manual_seed(7)
    indices = matcher(outputs, targets)

    assert len(indices) == 3
    empty_i, empty_j = indices[1]
    assert empty_i.dtype == torch.int64 and empty_j.dtype == torch.int64
    assert empty_i.numel() == 0 and empty_j.numel() == 0

    for (pred_logits, pred_masks, labels, masks), (rows, cols), pts in zip(
        [images[0], images[2]], [indices[0], indices[2]], coords
    ):
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == len(labels)
        assert sorted(cols.tolist()) == list(range(len(labels)))
        assert len(set(rows.tolist())) == len(rows)
        cost = explicit_cost(pred_logits, pred_masks, labels, masks, pts, weights)
        best_total, best_queries = brute_force_min(cost)
        total = sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist()))
        assert total == pytest.approx(best_total, abs=1e-5)
        assigned = [None] * len(labels)
        for q, t in zip(rows.tolist(), cols.tolist()):
            assigned[t] = q
        assert tuple(assigned) == best_queries  # random costs: the optimum is unique

        torch.manual_seed(11)
        pts2 = torch.rand(1, NUM_POINTS, 2)
        torch.manual_seed(11)
        matrix = matcher.cost_matrix(pred_logits, pred_masks, labels, masks)
        expected = explicit_cost(pred_logits, pred_masks, labels, masks, pts2, weights)
        assert matrix.dtype == torch.float32
        assert matrix.tolist() == [pytest.approx(row, abs=1e-5) for row in expected]


def test_as_many_targets_as_queries():
    g = torch.Generator().manual_seed(3)
    pred_logits, pred_masks, labels, masks = random_image(g, 4, 4)
    torch.manual_seed(0)
    ((rows, cols),) = HungarianMatcher(num_points=NUM_POINTS)(
        {"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]},
        [{"labels": labels, "masks": masks}],
    )
    assert sorted(rows.tolist()) == [0, 1, 2, 3] and sorted(cols.tolist()) == [0, 1, 2, 3]


def test_cost_is_float32_under_autocast_and_same_as_fp32():
    g = torch.Generator().manual_seed(5)
    pred_logits, pred_masks, labels, masks = random_image(g, 6, 3)
    pred_logits = pred_logits.bfloat16()
    pred_masks = pred_masks.bfloat16()
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=NUM_POINTS)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = matcher.cost_matrix(pred_logits, pred_masks, labels, masks)
    torch.manual_seed(1)
    full = matcher.cost_matrix(pred_logits.float(), pred_masks.float(), labels, masks)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0, atol=1e-6)


def test_matching_prefers_the_right_mask_and_class():
    # query 2 predicts target 0's mask and class, query 0 target 1's: the matcher must find it
    height, width = 8, 8
    left = torch.zeros(height, width, dtype=torch.bool)
    left[:, :4] = True
    masks = torch.stack([left, ~left])
    labels = torch.tensor([1, 3])
    pred_masks = torch.full((3, height, width), -8.0)
    pred_masks[2][left] = 8.0
    pred_masks[0][~left] = 8.0
    pred_logits = torch.zeros(3, 5)
    pred_logits[2, 1] = 5.0
    pred_logits[0, 3] = 5.0
    torch.manual_seed(0)
    ((rows, cols),) = HungarianMatcher(num_points=200)(
        {"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]},
        [{"labels": labels, "masks": masks}],
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def test_invalid_arguments():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError):
        HungarianMatcher(num_points=0)
    with pytest.raises(ValueError, match="unknown mask cost impl"):
        HungarianMatcher(impl="cuda")
    with pytest.raises(ValueError, match="unknown mask cost impl"):
        mask_costs(torch.zeros(1, 2, 2), torch.zeros(3, 2), torch.zeros(1, 3), impl="fast")
    with pytest.raises(TypeError, match="coords is torch.float64"):
        mask_costs(torch.zeros(1, 2, 2), torch.zeros(3, 2).double(), torch.zeros(1, 3), impl="cpu")
    with pytest.raises(ValueError, match="point counts differ"):
        mask_costs(torch.zeros(1, 2, 2), torch.zeros(4, 2), torch.zeros(1, 3), impl="cpu")
    with pytest.raises(ValueError, match="point counts differ"):
        weights = torch.ones(2)
        mask_costs(torch.zeros(1, 2, 2), torch.zeros(3, 2), torch.zeros(1, 3), weights, impl="cpu")


def reference_mask_costs(pred_masks, coords, tgt_points, weights):
    """[Q, T] BCE and dice costs in float64 from the definitions: the BCE averaged over the points
    (weighted mean with weights), the dice of s = sigmoid(x) with both sides weighted."""
    x = point_sample(pred_masks[None].double(), coords[None].double())[0]  # [Q, P]
    t = tgt_points.double()
    w = torch.ones(x.shape[1], dtype=torch.float64) if weights is None else weights.double()
    softplus = x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))  # log(1 + e^x), overflow-free
    bce = (softplus[:, None, :] - x[:, None, :] * t[None]) * w  # [Q, T, P]
    cost_mask = bce.sum(-1) / w.sum()
    s = torch.sigmoid(x)
    inter = ((s * w)[:, None, :] * (t * w)[None]).sum(-1)
    total = (s * w).sum(-1)[:, None] + (t * w).sum(-1)[None, :]
    return cost_mask, 1 - (2 * inter + 1) / (total + 1)


def _mask_cost_inputs(seed, queries, targets, points, scale, weighted, size=(9, 7)):
    g = torch.Generator().manual_seed(seed)
    pred_masks = torch.randn(queries, *size, generator=g) * scale
    pred_masks[0, :2] = 120.0  # logits far beyond softplus' and sigmoid's float32 range
    pred_masks[-1, -2:] = -120.0
    coords = torch.rand(points, 2, generator=g) * 1.3 - 0.15  # some points outside the map
    tgt_points = torch.rand(targets, points, generator=g)
    tgt_points[0] = tgt_points[0] > 0.5
    weights = torch.rand(points, generator=g) if weighted else None
    return pred_masks, coords, tgt_points, weights


@pytest.mark.parametrize(
    "queries, targets, points, scale, weighted",
    [
        (13, 1, 50, 3.0, False),
        (13, 4, 700, 3.0, True),
        (8, 3, 1100, 30.0, False),
        (1, 2, 9, 1.0, True),
    ],
)
def test_cpu_mask_costs_match_the_float64_reference(queries, targets, points, scale, weighted):
    """Channel counts that do not fill whole vectors, one and several blocks of points, points
    outside the map, extreme logits, point weights."""
    inputs = _mask_cost_inputs(0, queries, targets, points, scale, weighted)
    cost_mask, cost_dice = mask_costs(*inputs, impl="cpu")
    expected_mask, expected_dice = reference_mask_costs(*inputs)
    assert cost_mask.dtype == cost_dice.dtype == torch.float32
    assert cost_mask.shape == cost_dice.shape == (queries, targets)
    torch.testing.assert_close(cost_mask.double(), expected_mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cost_dice.double(), expected_dice, rtol=1e-5, atol=1e-6)
    pytorch_mask, pytorch_dice = mask_costs(*inputs, impl="pytorch")  # the same numbers
    torch.testing.assert_close(cost_mask, pytorch_mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cost_dice, pytorch_dice, rtol=1e-5, atol=1e-6)


def test_cpu_mask_costs_do_not_depend_on_the_thread_count():
    inputs = _mask_cost_inputs(1, 21, 3, 2600, 4.0, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mask_costs(*inputs, impl="cpu")
        torch.set_num_threads(3)
        three = mask_costs(*inputs, impl="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_matcher_on_cpu_uses_the_kernel_and_matches_like_the_pytorch_path():
    assert matcher_module._cpu_default() == "cpu"  # a C++ compiler is part of the set-up
    g = torch.Generator().manual_seed(4)
    images = [random_image(g, 20, t, pred_hw=(16, 12), tgt_hw=(64, 48)) for t in (4, 2)]
    outputs = {
        "pred_logits": torch.stack([im[0] for im in images]),
        "pred_masks": torch.stack([im[1] for im in images]),
    }
    targets = [{"labels": im[2], "masks": im[3]} for im in images]
    indices = {}
    for impl in ("auto", "cpu", "pytorch"):
        torch.manual_seed(3)
        indices[impl] = HungarianMatcher(2.0, 5.0, 5.0, num_points=500, impl=impl)(outputs, targets)
    for impl in ("auto", "cpu"):
        for (rows, cols), (rows_ref, cols_ref) in zip(indices[impl], indices["pytorch"]):
            assert torch.equal(rows, rows_ref) and torch.equal(cols, cols_ref)
