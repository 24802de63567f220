"""Tests of SetCriterion on hand-checkable inputs."""

import ast
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

NUM_CLASSES = 3
EOS = 0.1


class FixedMatcher:
    """Returns the same assignment for every prediction set; counts its calls."""

    def __init__(self, indices):
        self.indices = [
            (torch.tensor(i, dtype=torch.int64), torch.tensor(j, dtype=torch.int64))
            for i, j in indices
        ]
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return self.indices


def make_criterion(indices, num_points=20, losses=("labels", "masks")):
    return SetCriterion(
        NUM_CLASSES,
        matcher=FixedMatcher(indices),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=EOS,
        losses=list(losses),
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def test_empty_weight_buffer():
    criterion = make_criterion([([], [])])
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, EOS])
    assert "empty_weight" in dict(criterion.named_buffers())


def test_loss_labels_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, NUM_CLASSES + 1, generator=g)
    targets = [
        {"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4)},
        {"labels": torch.tensor([2, 0]), "masks": torch.zeros(2, 4, 4)},
    ]
    indices = [([2], [0]), ([0, 1], [1, 0])]
    criterion = make_criterion(indices, losses=("labels",))
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(2, 3, 4, 4)}
    loss = criterion(outputs, targets)["loss_ce"].item()

    # image 0: queries 0, 1 unmatched, query 2 -> class 1; image 1: query 0 -> class 0
    # (target 1), query 1 -> class 2 (target 0), query 2 unmatched
    classes = [[3, 3, 1], [0, 2, 3]]
    weight = [1.0, 1.0, 1.0, EOS]
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(3):
            row = logits[b, q].double().tolist()
            log_norm = math.log(sum(math.exp(v) for v in row))
            y = classes[b][q]
            num += weight[y] * (log_norm - row[y])
            den += weight[y]
    assert loss == pytest.approx(num / den, rel=1e-6)


def test_loss_masks_normalised_by_number_of_target_masks():
    # zero logits and empty targets are unchanged by grid_sample's zero padding, so every
    # sampled point has logit 0 and label 0: BCE log(2) and dice 1 - 1 / (P / 2 + 1) per mask
    num_points = 20
    pred_masks = torch.zeros(2, 3, 8, 8)
    empty = torch.zeros(1, 16, 16, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([1]), "masks": empty},
        {"labels": torch.tensor([2, 0]), "masks": torch.cat([empty, empty])},
    ]
    # only two of the three targets are matched: the sum over masks is still divided by 3
    criterion = make_criterion([([2], [0]), ([0], [1])], num_points=num_points, losses=("masks",))
    losses = criterion({"pred_logits": torch.zeros(2, 3, 4), "pred_masks": pred_masks}, targets)
    assert losses["loss_mask"].item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)
    dice = 1 - 1 / (num_points / 2 + 1)
    assert losses["loss_dice"].item() == pytest.approx(2 * dice / 3, rel=1e-6)


def test_loss_masks_on_importance_sampled_points():
    g = torch.Generator().manual_seed(2)
    pred_masks = torch.randn(2, 3, 6, 6, generator=g) * 2
    target_masks = torch.rand(2, 2, 12, 12, generator=g) > 0.6
    indices = [([1], [0]), ([0, 2], [1, 0])]
    criterion = make_criterion(indices, num_points=16, losses=("masks",))
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_masks": pred_masks}
    targets = [
        {"labels": torch.tensor([0]), "masks": target_masks[0, :1]},
        {"labels": torch.tensor([1, 2]), "masks": target_masks[1]},
    ]
    torch.manual_seed(5)
    losses = criterion(outputs, targets)

    # matched pairs in order: (image 0 query 1, target 0), (image 1 query 0, target 1),
    # (image 1 query 2, target 0); the points are drawn for all of them at once
    src = torch.stack([pred_masks[0, 1], pred_masks[1, 0], pred_masks[1, 2]])[:, None]
    tgt = torch.stack([target_masks[0, 0], target_masks[1, 1], target_masks[1, 0]])[:, None]
    torch.manual_seed(5)
    coords = get_uncertain_point_coords_with_randomness(src, calculate_uncertainty, 16, 3.0, 0.75)
    xs = point_sample(src.double(), coords.double())[:, 0].tolist()
    ys = point_sample(tgt.double(), coords.double())[:, 0].tolist()
    bce, dice = 0.0, 0.0
    for x, y in zip(xs, ys):
        bce += sum(softplus(xi) - xi * yi for xi, yi in zip(x, y)) / len(x)
        s = [1 / (1 + math.exp(-xi)) for xi in x]
        dice += 1 - (2 * sum(a * b for a, b in zip(s, y)) + 1) / (sum(s) + sum(y) + 1)
    assert losses["loss_mask"].item() == pytest.approx(bce / 3, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / 3, rel=1e-5)


def test_no_targets_gives_zero_mask_losses_and_no_object_ce():
    logits = torch.randn(2, 3, NUM_CLASSES + 1, requires_grad=True)
    pred_masks = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)}] * 2
    criterion = make_criterion([([], []), ([], [])])
    losses = criterion({"pred_logits": logits, "pred_masks": pred_masks}, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    expected = torch.nn.functional.cross_entropy(
        logits.detach().reshape(-1, NUM_CLASSES + 1), torch.full((6,), NUM_CLASSES)
    )
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert pred_masks.grad is not None and pred_masks.grad.abs().sum() == 0


class SequenceMatcher:
    """Returns the given assignments, one per call (prediction set), in order."""

    def __init__(self, per_call):
        self.per_call = list(per_call)

    def __call__(self, outputs, targets):
        indices = self.per_call.pop(0)
        return [(torch.tensor(i, dtype=torch.int64), torch.tensor(j)) for i, j in indices]


def _reference_mask_losses(src, tgt, coords):
    """Per-mask BCE and dice in float64 from the sampled points (pure Python sums)."""
    xs = point_sample(src.double(), coords.double())[:, 0].tolist()
    ys = point_sample(tgt.double(), coords.double())[:, 0].tolist()
    terms = []
    for x, y in zip(xs, ys):
        bce = sum(softplus(xi) - xi * yi for xi, yi in zip(x, y)) / len(x)
        s = [1 / (1 + math.exp(-xi)) for xi in x]
        dice = 1 - (2 * sum(a * b for a, b in zip(s, y)) + 1) / (sum(s) + sum(y) + 1)
        terms.append((bce, dice))
    return terms


@pytest.mark.parametrize("gather_limit", [None, 3 * 144])
def test_mask_losses_of_all_prediction_sets_evaluated_at_once(gather_limit):
    """Three prediction sets with their own matchings (the middle one matching nothing): each
    set's mask losses are the sums over its own matched masks, with the points of all sets'
    masks drawn at once (in set order), and gradients reach only the matched queries. With a
    gather limit of 3 target masks (of 12 x 12 pixels), the first two sets (3 masks) are drawn
    together and the third (2 more) on its own, after them."""
    g = torch.Generator().manual_seed(3)
    sets = [(torch.randn(2, 3, 6, 6, generator=g) * 2).requires_grad_() for _ in range(3)]
    target_masks = torch.rand(2, 2, 12, 12, generator=g) > 0.6
    matchings = [
        [([1], [0]), ([0, 2], [1, 0])],
        [([], []), ([], [])],
        [([2], [0]), ([1], [0])],
    ]
    criterion = SetCriterion(
        NUM_CLASSES,
        matcher=SequenceMatcher(matchings),
        weight_dict={},
        eos_coef=EOS,
        losses=["masks"],
        num_points=16,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    outputs = {
        "pred_logits": torch.zeros(2, 3, 4),
        "pred_masks": sets[0],
        "aux_outputs": [{"pred_logits": torch.zeros(2, 3, 4), "pred_masks": m} for m in sets[1:]],
    }
    targets = [
        {"labels": torch.tensor([0]), "masks": target_masks[0, :1]},
        {"labels": torch.tensor([1, 2]), "masks": target_masks[1]},
    ]
    if gather_limit is not None:
        criterion.mask_loss_gather_limit = gather_limit
    torch.manual_seed(5)
    losses = criterion(outputs, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("mask", "dice") for s in ("", "_0", "_1")}

    pairs = [  # (set, image, query, image's target) in set order, images in order
        (0, 0, 1, 0),
        (0, 1, 0, 1),
        (0, 1, 2, 0),
        (2, 0, 2, 0),
        (2, 1, 1, 0),
    ]
    src = torch.stack([sets[k][b, q].detach() for k, b, q, _ in pairs])[:, None]
    tgt = torch.stack([target_masks[b, t] for _, b, _, t in pairs])[:, None]
    torch.manual_seed(5)
    draws = [slice(0, 5)] if gather_limit is None else [slice(0, 3), slice(3, 5)]
    terms = []
    for rows in draws:
        coords = get_uncertain_point_coords_with_randomness(
            src[rows], calculate_uncertainty, 16, 3.0, 0.75
        )
        terms += _reference_mask_losses(src[rows], tgt[rows], coords)
    num_masks = 3
    for suffix, rows in (("", [0, 1, 2]), ("_1", [3, 4])):
        bce = sum(terms[r][0] for r in rows) / num_masks
        dice = sum(terms[r][1] for r in rows) / num_masks
        assert losses["loss_mask" + suffix].item() == pytest.approx(bce, rel=1e-5)
        assert losses["loss_dice" + suffix].item() == pytest.approx(dice, rel=1e-5)
    assert losses["loss_mask_0"].item() == 0 and losses["loss_dice_0"].item() == 0

    sum(losses.values()).backward()
    for k, masks in enumerate(sets):
        matched = {(b, q) for kk, b, q, _ in pairs if kk == k}
        for b in range(2):
            for q in range(3):
                assert (masks.grad[b, q].abs().sum() > 0) == ((b, q) in matched)


def test_deep_supervision_keys_and_matcher_per_prediction_set():
    criterion = make_criterion([([0], [0])])
    prediction = {"pred_logits": torch.randn(1, 2, 4), "pred_masks": torch.randn(1, 2, 4, 4)}
    outputs = dict(prediction, aux_outputs=[dict(prediction), dict(prediction)])
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)}]
    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    assert set(losses) == {
        f"loss_{name}{suffix}" for name in ("ce", "mask", "dice") for suffix in ("", "_0", "_1")
    }
    assert criterion.matcher.calls == 3
    # identical predictions: identical class losses in every set
    assert losses["loss_ce_0"].item() == pytest.approx(losses["loss_ce"].item())
    assert losses["loss_ce_1"].item() == pytest.approx(losses["loss_ce"].item())


def test_unknown_loss_raises():
    with pytest.raises(ValueError):
        make_criterion([([], [])], losses=("labels", "boxes"))


def _num_masks_worker(rank, port, result_file):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        criterion = make_criterion([([], [])])
        values = []
        for counts in ((3, 0), (0, 1)):
            targets = [{"labels": torch.zeros(counts[rank], dtype=torch.int64)}]
            values.append(criterion.num_masks(targets, torch.device("cpu")))
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(repr(values))
    finally:
        dist.destroy_process_group()


def test_num_masks_averaged_across_processes_and_clamped(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = str(tmp_path / "num_masks")
    # fork: the workers need no re-import of the project
    mp.start_processes(
        _num_masks_worker, args=(port, result_file), nprocs=2, join=True, start_method="fork"
    )
    for rank in range(2):
        with open(f"{result_file}.{rank}") as f:
            # (3 + 0) / 2 = 1.5; (0 + 1) / 2 = 0.5 is clamped to 1
            assert ast.literal_eval(f.read()) == pytest.approx([1.5, 1.0])


def test_num_masks_single_process():
    criterion = make_criterion([([], [])])
    assert criterion.num_masks([{"labels": torch.zeros(4)}, {"labels": torch.zeros(2)}], "cpu") == 6
    assert criterion.num_masks([{"labels": torch.zeros(0)}], "cpu") == 1


def test_batch_with_an_image_without_targets():
    """An empty image contributes only "no object" classification; mask losses come from the
    other image alone."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, NUM_CLASSES + 1, generator=g)
    pred_masks = torch.randn(2, 3, 6, 6, generator=g)
    mask = torch.rand(1, 12, 12, generator=g) > 0.5
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 12, 12, dtype=torch.bool),
    }
    full = {"labels": torch.tensor([2]), "masks": mask}
    both = make_criterion([([], []), ([1], [0])], num_points=16)
    torch.manual_seed(0)
    losses = both({"pred_logits": logits, "pred_masks": pred_masks}, [empty, full])
    alone = make_criterion([([1], [0])], num_points=16)
    torch.manual_seed(0)
    single = alone({"pred_logits": logits[1:], "pred_masks": pred_masks[1:]}, [full])
    assert losses["loss_mask"].item() == pytest.approx(single["loss_mask"].item(), rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(single["loss_dice"].item(), rel=1e-6)
    # classification: image 0 is all "no object" (weight EOS each), image 1 as alone
    no_object = torch.full((3,), NUM_CLASSES)
    nll0 = torch.nn.functional.cross_entropy(logits[0], no_object, reduction="sum")
    targets1 = torch.tensor([NUM_CLASSES, 2, NUM_CLASSES])
    nll1 = torch.nn.functional.cross_entropy(
        logits[1], targets1, weight=both.empty_weight, reduction="sum"
    )
    expected = (EOS * nll0 + nll1) / (3 * EOS + 1 + 2 * EOS)
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
