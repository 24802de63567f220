"""Tests of the host-device synchronisation fixes, on CPU.

A GPU training step used to wait for the device ~250 times: small constant tensors copied to the
device on every call, device tensors read back, boolean indexing, per-image copies. Here:

* every cache of device constants returns the same tensors for the same key (no new copy), other
  tensors for another geometry / device / dtype, and the values of the uncached computation;
  cached tensors are never inference tensors (an inference-mode evaluation may fill the caches
  before training uses them in autograd);
* code that must not read device data back runs on the "meta" device (which has no data: any
  read raises) or on :class:`Recorded` tensors, which log the calls that wait for a device;
* the results are those of the previous formulations.
"""

import contextlib
from typing import List, Optional

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F

from dinat.neighborhood_attention import flex, na2d_reference, na2d_tiled, reference, tiled
from mask2former.config import add_maskformer2_config
from mask2former.modeling import point_sampling
from mask2former.modeling.backbone import swin
from mask2former.modeling.criterion import SetCriterion, matched_indices
from mask2former.modeling.matcher import INVALID_COST, HungarianMatcher
from mask2former.modeling.meta_arch import (
    mask_former_model,
    resized_semantic_inference,
    semantic_inference_naive,
)
from mask2former.modeling.pixel_decoder import deformable_attention as deform
from mask2former.modeling.point_sampling import bilinear_resize_matrix, resize_bilinear
from mask2former.modeling.transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    masked_attention_mask,
)

CPU, META = torch.device("cpu"), torch.device("meta")


# ------------------------------------------------------------------ instrument
class _Log:
    events: Optional[List[tuple]] = None


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _target_device(args, kwargs):
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class Recorded(torch.Tensor):
    """A tensor that logs, while :func:`recording` is active, the calls that make the host wait
    for the device the tensor lives on: reads of its data ("read": item, tolist, numpy; "to_host":
    cpu), copies to another device ("copy", source, target) and data-dependent shapes
    ("data_dependent": nonzero, boolean-mask indexing). Results of operations on it are
    :class:`Recorded` too."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        events = _Log.events
        if events is not None:
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "numpy"):
                events.append(("read", name))
            elif name == "cpu":
                events.append(("to_host",))
            elif name == "to":
                target = _target_device(args, kwargs)
                if target is not None and target != args[0].device:
                    events.append(("copy", args[0].device.type, target.type))
            elif name in ("nonzero", "argwhere", "masked_select"):
                events.append(("data_dependent", name))
            elif name in ("__getitem__", "__setitem__") and _bool_index(args[1]):
                events.append(("data_dependent", name))
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def recording():
    _Log.events = []
    try:
        yield _Log.events
    finally:
        _Log.events = None


def count(events, kind) -> int:
    return sum(1 for e in events if e[0] == kind)


def test_recorded_tensors_log_what_waits_for_the_device():
    """The instrument itself: the official mask update and a read-back are logged."""
    x = torch.rand(2, 3, 4).as_subclass(Recorded) < 0.5
    with recording() as events:
        x[x.all(-1)] = False
        x.sum().item()
        x.to(META)
        x.to(CPU)  # same device: no copy
    assert [e[0] for e in events] == ["data_dependent", "read", "copy"]


def assert_not_inference(tensors):
    for t in tensors:
        assert isinstance(t, torch.Tensor) and not t.is_inference()


# ------------------------------------------------------------------ neighborhood attention
def test_flex_geometry_tensors_cached_per_geometry_and_device():
    first = flex._geometry_tensors(13, 9, 3, 2, CPU)
    assert flex._geometry_tensors(13, 9, 3, 2, CPU) is first
    assert [int(t) for t in first] == [13, 9, 3, 2]
    assert all(t.dtype == torch.int64 and t.dim() == 0 for t in first)
    for other in ((13, 9, 3, 1, CPU), (9, 13, 3, 2, CPU), (13, 9, 3, 2, META)):
        assert flex._geometry_tensors(*other) is not first
    assert flex._geometry_tensors(13, 9, 3, 2, META)[0].device == META
    flex._geometry_tensors.cache_clear()
    with torch.inference_mode():
        made_in_inference = flex._geometry_tensors(17, 11, 5, 3, CPU)
    assert_not_inference(made_in_inference)


def test_flex_mods_use_the_cached_geometry():
    """Two calls of the mods for the same geometry read the same tensors (their closures)."""
    _, mask_a = flex._flex_mods(12, 10, 3, 2, None, CPU)
    _, mask_b = flex._flex_mods(12, 10, 3, 2, None, "cpu")
    cells_a = {id(c.cell_contents) for c in mask_a.__closure__}
    cells_b = {id(c.cell_contents) for c in mask_b.__closure__}
    geometry = {id(t) for t in flex._geometry_tensors(12, 10, 3, 2, CPU)}
    assert geometry & cells_a and geometry & cells_a == geometry & cells_b


def test_reference_neighbours_cached_on_device():
    keys, bias = reference._device_neighbors_1d(11, 3, 2, CPU)
    assert reference._device_neighbors_1d(11, 3, 2, CPU)[0] is keys
    assert reference._device_neighbors_1d(11, 3, 1, CPU)[0] is not keys
    meta_keys, _ = reference._device_neighbors_1d(11, 3, 2, META)
    assert meta_keys is not keys and meta_keys.device == META
    # query 0 (group 0): keys 0, 2, 4; query 10 (group 0, shifted border window): 6, 8, 10
    assert keys[0].tolist() == [0, 2, 4] and keys[10].tolist() == [6, 8, 10]
    assert bias[10].tolist() == [0, 1, 2]


def test_tiled_masks_made_in_inference_mode_train_later():
    """The tiling cache filled during an inference-mode evaluation is then used by a training
    step whose backward saves its masks (inference tensors cannot be saved for backward)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 23, 19, 2, 4, generator=g) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g)
    tiled._grid_tiling.cache_clear()
    with torch.inference_mode():
        na2d_tiled(q, k, v, rpb, 3)
    rpb.requires_grad_(True)
    out = na2d_tiled(q, k, v, rpb, 3)
    out.sum().backward()
    ref_rpb = rpb.detach().clone().requires_grad_(True)
    na2d_reference(q, k, v, ref_rpb, 3).sum().backward()
    torch.testing.assert_close(rpb.grad, ref_rpb.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ resize matrices
def _interpolate_matrix(in_size, out_size):
    """The resize matrix from F.interpolate of the identity (float64)."""
    eye = torch.eye(in_size, dtype=torch.float64)[None]  # [1, in (channels), in (positions)]
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].t()


def test_bilinear_resize_matrix_cached_per_sizes_device_dtype():
    first = bilinear_resize_matrix(7, 19, dtype=torch.float64)
    assert bilinear_resize_matrix(7, 19, "cpu", torch.float64) is first
    torch.testing.assert_close(first, _interpolate_matrix(7, 19), rtol=0, atol=1e-12)
    others = [
        bilinear_resize_matrix(7, 18, dtype=torch.float64),
        bilinear_resize_matrix(8, 19, dtype=torch.float64),
        bilinear_resize_matrix(7, 19, dtype=torch.float32),
        bilinear_resize_matrix(7, 19, META, torch.float64),
    ]
    assert all(o is not first for o in others)
    assert others[3].device == META and others[2].dtype == torch.float32


def test_resize_matrix_made_in_inference_mode_trains_later():
    point_sampling._cached_resize_matrix.cache_clear()
    with torch.inference_mode():
        bilinear_resize_matrix(13, 5)
        bilinear_resize_matrix(11, 3)
    assert_not_inference([bilinear_resize_matrix(13, 5), bilinear_resize_matrix(11, 3)])
    x = torch.randn(2, 13, 11, requires_grad=True)
    resize_bilinear(x, (5, 3)).sum().backward()
    expected = F.interpolate(x.detach()[None], size=(5, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_bilinear(x.detach(), (5, 3)), expected[0])
    assert x.grad is not None


def test_semantic_inference_resize_matrix_cached_and_band_sources_on_host():
    steps = ((64, 50), (40, 40))
    first = mask_former_model._resize_matrix(16, steps, CPU)
    assert mask_former_model._resize_matrix(16, [(64, 50), (40, 40)], "cpu") is first
    assert mask_former_model._resize_matrix(16, ((64, 50),), CPU) is not first
    assert mask_former_model._resize_matrix(16, steps, META) is not first
    # the composed matrix: upsample 16 -> 64, keep 50, resize 50 -> 40
    expected = _interpolate_matrix(50, 40) @ _interpolate_matrix(16, 64)[:50]
    torch.testing.assert_close(first.double(), expected, rtol=0, atol=1e-6)
    first_src, last_src = mask_former_model._band_sources(16, steps)
    rows = first.tolist()
    assert list(first_src) == [next(j for j, v in enumerate(r) if v != 0) for r in rows]
    assert list(last_src) == [max(j for j, v in enumerate(r) if v != 0) for r in rows]


def test_semantic_inference_resize_matrix_made_under_autocast_is_float32():
    mask_former_model._host_resize_matrix.cache_clear()
    mask_former_model._device_resize_matrix.cache_clear()
    steps = ((32, 30), (20, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_former_model._resize_matrix(8, steps, CPU)
    matrix = mask_former_model._resize_matrix(8, steps, CPU)
    assert matrix.dtype == torch.float32
    expected = _interpolate_matrix(30, 20) @ _interpolate_matrix(8, 32)[:30]
    torch.testing.assert_close(matrix.double(), expected, rtol=0, atol=1e-6)


def test_semantic_inference_reads_nothing_back_from_the_device():
    """On the meta device (no data) every read-back raises: the band bounds come from the host.
    On CPU the result is the definition's."""
    args = dict(padded_size=(64, 64), image_size=(50, 60), output_size=(40, 70))
    g = torch.Generator().manual_seed(2)
    mask_cls, mask_pred = torch.randn(5, 4, generator=g), torch.randn(5, 16, 16, generator=g)
    out = resized_semantic_inference(mask_cls.to(META), mask_pred.to(META), **args)
    assert out.device == META and out.shape == (3, 40, 70)
    got = resized_semantic_inference(mask_cls, mask_pred, **args)
    up = F.interpolate(mask_pred[None], size=(64, 64), mode="bilinear", align_corners=False)
    scores = semantic_inference_naive(mask_cls, up[0, :, :50, :60])
    expected = F.interpolate(scores[None], size=(40, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ deformable attention
def test_deformable_level_constants_cached_per_shapes_device_dtype():
    shapes = ((8, 6), (4, 3))
    first = deform._level_constants(shapes, CPU, torch.float32)
    assert deform._level_constants(shapes, CPU, torch.float32) is first
    assert first.sizes.tolist() == [[6.0, 8.0], [3.0, 4.0]]
    assert float(first.minus_half) == -0.5 and float(first.minus_one) == -1.0
    for other in (
        (((8, 6),), CPU, torch.float32),
        (shapes, CPU, torch.float64),
        (shapes, META, torch.float32),
    ):
        assert deform._level_constants(*other) is not first
    row_len, level_base = deform._corner_constants(shapes, 2, CPU, torch.int32)
    assert deform._corner_constants(shapes, 2, CPU, torch.int32)[0] is row_len
    assert deform._corner_constants(shapes, 3, CPU, torch.int32)[1] is not level_base
    # padded rows: 6 + 3 and 3 + 3 long; level 1 starts after (8 + 3) * 9 padded positions; the
    # first pixel is 1 row and 1 column in; 2 heads per position
    assert row_len.flatten().tolist() == [9, 6]
    assert level_base.flatten().tolist() == [(0 + 9 + 1) * 2, (99 + 6 + 1) * 2]
    deform._level_constants.cache_clear()
    deform._corner_constants.cache_clear()
    with torch.inference_mode():
        made = deform._level_constants(((5, 5),), CPU, torch.float32)
        made_corners = deform._corner_constants(((5, 5),), 1, CPU, torch.int64)
    assert_not_inference(list(made) + list(made_corners))


@pytest.mark.parametrize("impl", ["pytorch", "fast", "cpu"])
def test_msdeformattn_takes_python_shapes_and_a_tensor_alike(impl):
    torch.manual_seed(3)
    attn = deform.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl=impl)
    shapes = ((6, 5), (3, 3))
    src = torch.randn(2, 39, 16)
    query = torch.randn(2, 7, 16)
    ref = torch.rand(2, 7, 2, 2)
    results = []
    for spatial_shapes in (shapes, torch.tensor(shapes), shapes):
        src_grad = src.clone().requires_grad_(True)
        out = attn(query, ref, src_grad, spatial_shapes)
        out.square().sum().backward()
        results.append((out.detach(), src_grad.grad))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


# ------------------------------------------------------------------ transformer decoder
def official_attention_mask(mask_logits):
    attn_mask = mask_logits.flatten(2).sigmoid() < 0.5
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    return attn_mask


def test_attention_mask_equals_the_official_boolean_index_version():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, 4, 5, generator=g)
    logits[0, 2] = -5.0  # fully blocked rows (un-masked by both)
    logits[1, :4] = -1.0
    logits[2, 7] = 3.0  # fully open row
    expected = official_attention_mask(logits)
    assert expected.shape == (3, 10, 20) and not expected[0, 2].any()
    assert torch.equal(masked_attention_mask(logits), expected)
    for seed in range(5):
        g.manual_seed(seed)
        # strongly negative logits: many rows are fully blocked
        logits = torch.randn(2, 6, 3, 3, generator=g) - 2.0
        assert torch.equal(masked_attention_mask(logits), official_attention_mask(logits))


def test_attention_mask_has_no_data_dependent_step():
    logits = (torch.randn(2, 5, 3, 3) - 2.0).as_subclass(Recorded)
    with recording() as events:
        masked_attention_mask(logits)
    assert events == []


# ------------------------------------------------------------------ Swin
def test_window_layout_cached_per_map_window_shift_device():
    first = swin.window_layout(9, 11, 4, 2, CPU)
    assert swin.window_layout(9, 11, 4, 2, CPU) is first
    for other in ((9, 11, 4, 0, CPU), (11, 9, 4, 2, CPU), (9, 11, 4, 2, META)):
        assert swin.window_layout(*other) is not first
    # the official padding, cyclic shift and partition of the token indices (padding -> H * W)
    tokens = torch.arange(9 * 11).view(1, 9, 11, 1)
    padded = F.pad(tokens, (0, 0, 0, 1, 0, 3), value=9 * 11)
    shifted = torch.roll(padded, shifts=(-2, -2), dims=(1, 2))
    expected = swin.window_partition(shifted, 4).reshape(-1)
    assert torch.equal(first.partition_index, expected)
    assert torch.equal(first.partition_index[first.reverse_index], torch.arange(9 * 11))
    assert first.attn_mask is not None and swin.window_layout(9, 11, 4, 0, CPU).attn_mask is None
    swin.window_layout.cache_clear()
    with torch.inference_mode():
        made = swin.window_layout(5, 6, 4, 2, CPU)
    assert_not_inference([made.partition_index, made.reverse_index, made.attn_mask])


def test_swin_stage_reuses_its_layouts_and_trains_after_inference_mode():
    torch.manual_seed(5)
    stage = swin.SwinStage(dim=8, depth=2, num_heads=2, window_size=4)
    x = torch.randn(2, 10 * 7, 8)
    swin.window_layout.cache_clear()
    with torch.inference_mode():
        expected = stage(x, 10, 7).out
    layouts = [swin.window_layout(10, 7, 4, s, CPU) for s in (0, 2)]
    x.requires_grad_(True)
    out = stage(x, 10, 7).out
    out.sum().backward()  # the layouts (from inference mode) are saved for backward
    assert all(swin.window_layout(10, 7, 4, s, CPU) is lay for s, lay in zip((0, 2), layouts))
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ matcher
def _matcher_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(4, 6, 5, generator=g),
        "pred_masks": torch.randn(4, 6, 8, 8, generator=g),
    }
    outputs["pred_masks"][2, 1] = float("inf")  # gives inf / NaN costs
    counts = (3, 0, 2, 6)
    targets = [
        {
            "labels": torch.randint(0, 4, (n,), generator=g),
            "masks": torch.rand(n, 16, 16, generator=g) > 0.5,
        }
        for n in counts
    ]
    return outputs, targets


def _per_image_matching(matcher, outputs, targets):
    """The previous formulation: one cost matrix, one host copy and one assignment per image."""
    indices = []
    for b, target in enumerate(targets):
        if target["labels"].numel() == 0:
            indices.append(([], []))
            continue
        cost = matcher.cost_matrix(
            outputs["pred_logits"][b], outputs["pred_masks"][b], target["labels"], target["masks"]
        )
        cost = torch.nan_to_num(cost, nan=INVALID_COST, posinf=INVALID_COST, neginf=-INVALID_COST)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        indices.append((rows.tolist(), cols.tolist()))
    return indices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_one_transfer_same_assignment_as_per_image(seed):
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=50)
    outputs, targets = _matcher_inputs(seed)
    torch.manual_seed(seed)
    expected = _per_image_matching(matcher, outputs, targets)
    torch.manual_seed(seed)
    got = matcher(outputs, targets)
    assert [(r.tolist(), c.tolist()) for r, c in got] == expected
    assert all(r.dtype == torch.int64 and c.dtype == torch.int64 for r, c in got)
    assert got[1][0].numel() == 0


def test_matcher_copies_all_costs_to_the_host_at_once():
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=50)
    outputs, targets = _matcher_inputs(0)
    recorded = {k: v.as_subclass(Recorded) for k, v in outputs.items()}
    with recording() as events:
        matcher(recorded, targets)
    assert count(events, "to_host") == 1  # three images with targets


# ------------------------------------------------------------------ criterion
class CountingMatcher(HungarianMatcher):
    """A HungarianMatcher that counts its calls."""

    calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return super().forward(outputs, targets)


class FixedMatcher:
    """The same assignment (host tensors, optionally Recorded) for every prediction set."""

    def __init__(self, indices, recorded=False):
        self.indices = [
            (torch.tensor(i, dtype=torch.int64), torch.tensor(j, dtype=torch.int64))
            for i, j in indices
        ]
        if recorded:
            self.indices = [
                (i.as_subclass(Recorded), j.as_subclass(Recorded)) for i, j in self.indices
            ]

    def __call__(self, outputs, targets):
        return self.indices


def _criterion(matcher, num_points=32):
    return SetCriterion(
        4,
        matcher=matcher,
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def test_matched_indices_one_tensor_per_role():
    indices = [
        (torch.tensor([4, 1]), torch.tensor([0, 2])),
        (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
        (torch.tensor([3]), torch.tensor([1])),
    ]
    matched = matched_indices(indices, CPU)
    assert matched.batch.tolist() == [0, 0, 2]
    assert matched.src.tolist() == [4, 1, 3]
    assert [t.tolist() for t in matched.tgt] == [[0, 2], [], [1]]


def test_criterion_one_index_copy_per_prediction_set():
    """On the meta device: the matched indices of each prediction set reach the device in one
    copy (they took 2 per image and loss), and nothing is read back (meta has no data)."""
    criterion = _criterion(FixedMatcher([([0, 2], [1, 0]), ([1], [0])], recorded=True)).to(META)
    prediction = {
        "pred_logits": torch.randn(2, 4, 5, device=META),
        "pred_masks": torch.randn(2, 4, 8, 8, device=META),
    }
    outputs = dict(prediction, aux_outputs=[dict(prediction), dict(prediction)])
    targets = [
        {"labels": torch.zeros(2, dtype=torch.int64, device=META),
         "masks": torch.zeros(2, 16, 16, device=META)},
        {"labels": torch.zeros(1, dtype=torch.int64, device=META),
         "masks": torch.zeros(1, 16, 16, device=META)},
    ]  # fmt: skip
    with recording() as events:
        losses = criterion(outputs, targets)
    assert len(losses) == 9
    assert [e for e in events if e[0] == "copy"] == [("copy", "cpu", "meta")] * 3
    assert count(events, "read") == count(events, "to_host") == 0


def test_num_masks_is_a_host_number_in_a_single_process():
    criterion = _criterion(FixedMatcher([]))
    targets = [{"labels": torch.zeros(n, dtype=torch.int64, device=META)} for n in (3, 2)]
    assert criterion.num_masks(targets, META) == 5.0
    assert criterion.num_masks([{"labels": torch.zeros(0, device=META)}], META) == 1.0


def _decoder(deep_supervision):
    torch.manual_seed(6)
    return MultiScaleMaskedTransformerDecoder(
        8,
        num_classes=4,
        hidden_dim=16,
        num_queries=5,
        nheads=2,
        dim_feedforward=32,
        dec_layers=3,
        pre_norm=False,
        mask_dim=16,
        enforce_input_project=False,
        deep_supervision=deep_supervision,
    ).train()


def _decoder_inputs():
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 8, s, s, generator=g) for s in (2, 4, 8)]
    mask_features = torch.randn(2, 16, 16, 16, generator=g)
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 64, 64, generator=g) > 0.5},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, 64, 64, generator=g) > 0.5},
    ]
    return feats, mask_features, targets


def test_without_deep_supervision_one_matching_per_step_same_final_losses():
    feats, mask_features, targets = _decoder_inputs()
    losses, outputs = {}, {}
    for deep_supervision in (True, False):
        # the loss weights of DEEP_SUPERVISION False: final prediction only
        criterion = _criterion(CountingMatcher(2.0, 5.0, 5.0, num_points=40))
        outputs[deep_supervision] = _decoder(deep_supervision)(feats, mask_features)
        torch.manual_seed(8)
        losses[deep_supervision] = criterion(outputs[deep_supervision], targets)
        calls = criterion.matcher.calls
        assert calls == (4 if deep_supervision else 1)
        assert len(outputs[deep_supervision]["aux_outputs"]) == (3 if deep_supervision else 0)
    assert set(losses[False]) == set(_criterion(None).weight_dict)
    assert set(losses[True]) > set(losses[False])
    # before, the decoder returned the auxiliary predictions anyway: the final prediction and its
    # losses are those (the deep-supervised decoder's final prediction, scored alone)
    for key in ("pred_logits", "pred_masks"):
        assert torch.equal(outputs[False][key], outputs[True][key])
    final_only = {key: outputs[True][key] for key in ("pred_logits", "pred_masks")}
    torch.manual_seed(8)
    expected = _criterion(CountingMatcher(2.0, 5.0, 5.0, num_points=40))(final_only, targets)
    for name, value in losses[False].items():
        assert torch.equal(value, expected[name])


def test_decoder_deep_supervision_from_config():
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 16
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 5
    cfg.MODEL.MASK_FORMER.NHEADS = 2
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 32
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    feats, mask_features, _ = _decoder_inputs()
    for deep_supervision, aux in ((True, 2), (False, 0)):
        cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = deep_supervision
        decoder = build_transformer_decoder(cfg, 8).train()
        assert decoder.deep_supervision is deep_supervision
        assert len(decoder(feats, mask_features)["aux_outputs"]) == aux
        # asked for explicitly, the intermediate predictions are still there
        assert len(decoder(feats, mask_features, return_aux=True)["aux_outputs"]) == 2
