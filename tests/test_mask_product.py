"""The decoder's mask product and its row-skipping backward (mask_product.py), against a float64
brute-force reference and against the dense backward through the real matcher and criterion."""

import itertools

import pytest
import torch

from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.matcher import HungarianMatcher
from mask2former.modeling.transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    mask_product,
)
from mask2former.modeling.transformer_decoder.mask_product import mask_logits


def brute_force(embeds, features, grad):
    """Logits and both gradients of ``logits = embeds @ features`` by explicit sums (float64)."""
    batch, rows, channels = embeds.shape
    points = features.shape[2]
    logits = torch.zeros(batch, rows, points, dtype=torch.float64)
    grad_embeds = torch.zeros(batch, rows, channels, dtype=torch.float64)
    grad_features = torch.zeros(batch, channels, points, dtype=torch.float64)
    for b, n, p in itertools.product(range(batch), range(rows), range(points)):
        logits[b, n, p] = sum(embeds[b, n, c] * features[b, c, p] for c in range(channels))
    for b, n, c in itertools.product(range(batch), range(rows), range(channels)):
        grad_embeds[b, n, c] = sum(grad[b, n, p] * features[b, c, p] for p in range(points))
    for b, c, p in itertools.product(range(batch), range(channels), range(points)):
        grad_features[b, c, p] = sum(grad[b, n, p] * embeds[b, n, c] for n in range(rows))
    return logits, grad_embeds, grad_features


def _inputs(batch=3, rows=9, channels=5, points=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, rows, channels, generator=g, dtype=dtype)
    features = torch.randn(batch, channels, points, generator=g, dtype=dtype)
    return embeds, features, g


@pytest.mark.parametrize(
    "live_rows",
    [
        [[1, 4], [], [0]],  # sparse, with an image whose rows all have zero gradient
        [list(range(9)), [2], [3, 8]],  # one image dense: the dense products
        [[], [], []],  # no gradient at all (a batch without targets)
    ],
)
def test_values_and_gradients_equal_the_brute_force_sums(live_rows):
    embeds, features, g = _inputs()
    grad = torch.zeros(3, 9, 7, dtype=torch.float64)
    for b, rows in enumerate(live_rows):
        for n in rows:
            grad[b, n] = torch.randn(7, generator=g, dtype=torch.float64)
    grad[0, 1, 3] = 0.0  # a live row with a zero entry stays live
    e, f = embeds.clone().requires_grad_(), features.clone().requires_grad_()
    logits = mask_logits(e, f)
    assert type(logits.grad_fn).__name__ == "_MaskProductBackward"
    logits.backward(grad)
    want_logits, want_grad_embeds, want_grad_features = brute_force(embeds, features, grad)
    torch.testing.assert_close(logits.detach(), want_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e.grad, want_grad_embeds, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.grad, want_grad_features, rtol=1e-12, atol=1e-12)


def test_a_nan_in_the_gradient_propagates_as_in_the_dense_backward():
    embeds, features, _ = _inputs(batch=2, rows=6, channels=4, points=5, seed=2)
    grad = torch.zeros(2, 6, 5, dtype=torch.float64)
    grad[0, 3, 1] = float("nan")
    grad[1, 0] = 1.0
    results = []
    for product in (mask_logits, torch.bmm):
        e, f = embeds.clone().requires_grad_(), features.clone().requires_grad_()
        product(e, f).backward(grad)
        results.append((e.grad, f.grad))
    (e_sparse, f_sparse), (e_dense, f_dense) = results
    assert e_sparse[0, 3].isnan().all() and f_sparse[0, :, 1].isnan().all()
    torch.testing.assert_close(e_sparse, e_dense, equal_nan=True)
    torch.testing.assert_close(f_sparse, f_dense, equal_nan=True)


@pytest.mark.parametrize("needs", ["embeds", "features"])
def test_one_input_needing_a_gradient(needs):
    embeds, features, _ = _inputs(batch=2, rows=6, channels=4, points=5, seed=1)
    grad = torch.zeros(2, 6, 5, dtype=torch.float64)
    grad[0, 2] = 1.0
    grad[1, 5, 4] = -2.0
    e = embeds.clone().requires_grad_(needs == "embeds")
    f = features.clone().requires_grad_(needs == "features")
    mask_logits(e, f).backward(grad)
    _, want_grad_embeds, want_grad_features = brute_force(embeds, features, grad)
    if needs == "embeds":
        torch.testing.assert_close(e.grad, want_grad_embeds, rtol=1e-12, atol=1e-12)
        assert f.grad is None
    else:
        torch.testing.assert_close(f.grad, want_grad_features, rtol=1e-12, atol=1e-12)
        assert e.grad is None


def test_plain_product_without_gradients_or_under_autocast():
    embeds, features, _ = _inputs(dtype=torch.float32)
    with torch.no_grad():
        assert mask_logits(embeds.requires_grad_(), features).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mask_logits(embeds, features)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "BmmBackward0"


class RecordingMatcher(HungarianMatcher):
    """The Hungarian matcher, keeping each assignment it returns."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.assignments = []

    def forward(self, outputs, targets):
        indices = super().forward(outputs, targets)
        self.assignments.append(indices)
        return indices


def test_the_criterion_leaves_unmatched_rows_without_gradient_and_both_backwards_agree(
    monkeypatch,
):
    """Through the real matcher and criterion with deep supervision (float64): the logits of
    unmatched queries get exactly zero gradient, and every parameter's gradient equals the one
    of the dense backward."""
    torch.manual_seed(0)
    decoder = MultiScaleMaskedTransformerDecoder(
        16, num_classes=3, hidden_dim=16, num_queries=12, nheads=2, dim_feedforward=24,
        dec_layers=3, pre_norm=False, mask_dim=16, enforce_input_project=False,
    ).double().train()  # fmt: skip
    criterion = SetCriterion(
        3,
        matcher=RecordingMatcher(cost_class=2, cost_mask=5, cost_dice=5, num_points=40),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=40,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 16, s, s, generator=g, dtype=torch.float64) for s in (2, 4, 8)]
    mask_features = torch.randn(2, 16, 16, 16, generator=g, dtype=torch.float64)
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 16, 16, generator=g) > 0.5},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, 16, 16, generator=g) > 0.5},
    ]
    for t in targets:
        t["masks"] = t["masks"].double()

    grads = {}
    for name, fraction in (("sparse", mask_product.SPARSE_ROW_FRACTION), ("dense", 0.0)):
        monkeypatch.setattr(mask_product, "SPARSE_ROW_FRACTION", fraction)
        decoder.zero_grad()
        torch.manual_seed(3)  # the same points in both runs
        outputs = decoder(feats, mask_features)
        sets = [outputs] + outputs["aux_outputs"]
        for s in sets:
            s["pred_masks"].retain_grad()
        criterion.matcher.assignments.clear()
        losses = criterion(outputs, targets)
        sum(losses.values()).backward()
        grads[name] = {n: p.grad.clone() for n, p in decoder.named_parameters()}
        if name == "sparse":
            # (the criterion matches the final set first, then the auxiliary ones in order)
            assert len(criterion.matcher.assignments) == len(sets) == 4
            for s, indices in zip(sets, criterion.matcher.assignments):
                live = s["pred_masks"].grad.flatten(2).ne(0).any(dim=2)
                want = torch.zeros_like(live)
                for b, (src, _) in enumerate(indices):
                    want[b, src] = True
                assert torch.equal(live, want)  # the matched queries only
    assert len(grads["sparse"]) > 10
    for n in grads["sparse"]:
        torch.testing.assert_close(grads["sparse"][n], grads["dense"][n], rtol=1e-10, atol=1e-12)
