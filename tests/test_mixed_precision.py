"""Mixed precision: the AMP training loop (float16 / bfloat16), the float32 parts under autocast
(point sampling of the losses, deformable attention) and the matcher with inf logits.

Autocast runs on CPU here with bfloat16 (what CPUs support); on GPU the same code runs with
float16 or bfloat16 (benchmarks/gpu_check.py checks it there)."""

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage
from torch import nn

from mask2former.engine.amp import MixedPrecisionTrainer, amp_dtype
from mask2former.engine.setup import build_cfg
from mask2former.engine.trainer import build_step_trainer
from mask2former.modeling import HungarianMatcher, MSDeformAttn, MSDeformAttnPixelDecoder
from mask2former.modeling.point_sampling import point_sample


# ------------------------------------------------------------------------------ AMP loop
class RecordingModel(nn.Module):
    """Returns a loss dict; records the dtype its linear layer computed in."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.dtypes = []

    def forward(self, batch):
        out = self.fc(batch)
        self.dtypes.append(out.dtype)
        return {"loss": out.float().pow(2).mean()}


def _loader():
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 4, generator=g)


@pytest.mark.parametrize("precision,scaled", [(torch.bfloat16, False), (torch.float16, True)])
def test_mixed_precision_trainer_autocasts_and_scales_only_float16(precision, scaled):
    torch.manual_seed(0)
    model = RecordingModel()
    before = model.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = MixedPrecisionTrainer(model, _loader(), optimizer, precision=precision)
    with EventStorage(0):
        for _ in range(5):  # float16: the first steps may overflow at the initial loss scale
            trainer.run_step()
    assert model.dtypes == [precision] * 5
    assert trainer.grad_scaler.is_enabled() is scaled
    assert not torch.equal(model.fc.weight, before)  # the optimizer stepped
    state = trainer.state_dict()
    assert "grad_scaler" in state
    trainer.load_state_dict(state)


def test_float16_loop_clips_unscaled_gradients_with_the_fused_adamw():
    """Full-model clipping must see the true gradients: with the fused AdamW, GradScaler.step
    leaves the unscaling to the kernel, after the clipping (here at norm 1e3, far above the true
    gradient norm and far below the scaled one) would have cut the scaled gradients."""
    from mask2former.engine import build_optimizer, get_project_cfg

    torch.manual_seed(0)
    model = RecordingModel()
    cfg = get_project_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1e3
    optimizer = build_optimizer(cfg, model)
    assert optimizer.param_groups[0]["fused"]
    batch = next(_loader())
    reference = copy.deepcopy(model)
    reference(batch)["loss"].backward()
    true_norm = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    assert 0.01 < true_norm < 10

    trainer = MixedPrecisionTrainer(model, _loader(), optimizer, precision=torch.float16)
    # a scale that keeps float16 gradients finite and puts the scaled norm above the clip value
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    assert true_norm * 4096.0 > 4 * 1e3
    with EventStorage(0):
        trainer.run_step()
    seen = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(seen, true_norm, rtol=2e-2, atol=0.0)


def test_amp_precision_key_selects_the_loop():
    assert amp_dtype("bfloat16") is torch.bfloat16 and amp_dtype("bf16") is torch.bfloat16
    assert amp_dtype("float16") is torch.float16 and amp_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of"):
        amp_dtype("float8")
    cfg = build_cfg(
        opts=[
            "MODEL.DEVICE",
            "cuda",
            "SOLVER.AMP.ENABLED",
            "True",
            "SOLVER.AMP.PRECISION",
            "bfloat16",
        ]
    )
    model = RecordingModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = build_step_trainer(cfg, model, _loader(), optimizer)
    assert isinstance(loop, MixedPrecisionTrainer) and loop.precision is torch.bfloat16
    assert build_cfg().SOLVER.AMP.PRECISION == "float16"  # the default
    fp32 = build_step_trainer(build_cfg(), model, _loader(), optimizer)
    assert type(fp32) is SimpleTrainer


# ------------------------------------------------------------------------------ point sampling
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_point_sample_keeps_float32_coordinates_for_half_precision_maps(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 1, 40, 40, generator=g) * 4).to(dtype)
    coords = torch.rand(3, 500, 2, generator=g)
    grid = 2 * coords[:, :, None] - 1
    expected = F.grid_sample(logits.float(), grid, align_corners=False)[..., 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = point_sample(logits, coords)
    plain = point_sample(logits, coords)
    for out in (under_autocast, plain):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # coordinates rounded to the map's precision (the previous behaviour) move the points:
    rounded = 2 * coords.to(dtype).float()[:, :, None] - 1
    moved = F.grid_sample(logits.float(), rounded, align_corners=False)[..., 0]
    assert (moved - expected).abs().max() > 1e-3


def test_point_sample_keeps_float64():
    maps = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert point_sample(maps, torch.rand(1, 7, 2)).dtype == torch.float64


# ------------------------------------------------------------------------------ matcher
def test_matcher_treats_inf_logits_as_the_worst_match():
    """fp16 mask logits that overflowed to inf give NaN / inf costs, which scipy rejects."""
    masks = torch.zeros(2, 16, 16)
    masks[0, :8] = 1
    masks[1, 8:] = 1
    pred_masks = torch.stack([masks[0], masks[1], masks[0]]) * 20 - 10  # logits of 3 queries
    pred_masks[2] = math.inf  # query 2 overflowed
    pred_masks = pred_masks.half()
    pred_logits = torch.zeros(3, 3)
    outputs = {"pred_logits": pred_logits[None], "pred_masks": pred_masks[None]}
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks}]
    matcher = HungarianMatcher(cost_class=1, cost_mask=5, cost_dice=5, num_points=256)
    cost = matcher.cost_matrix(pred_logits, pred_masks, targets[0]["labels"], masks)
    assert not torch.isfinite(cost[2]).all()  # what linear_sum_assignment used to receive
    ((rows, cols),) = matcher(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


# ------------------------------------------------------------------------- deformable attention
def _core_module():
    """The module holding the deformable attention implementations (found from the class)."""
    return importlib.import_module(MSDeformAttn.__module__)


def test_deformable_attention_core_runs_in_float32_under_autocast(monkeypatch):
    """Under autocast the projections run in bfloat16, but the sampling core gets float32 inputs;
    its output equals an fp32 run on the same inputs to 1e-6, which a bfloat16 run fails."""
    impls = _core_module().MS_DEFORM_ATTN_IMPLS
    reference = impls["pytorch"]
    calls = []

    def recording(value, shapes, locations, weights):
        out = reference(value, shapes, locations, weights)
        calls.append((value, shapes, locations, weights, out))
        return out

    monkeypatch.setitem(impls, "pytorch", recording)
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="pytorch")
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.5)  # points off the pixel grid
        attn.attention_weights.weight.normal_()
    shapes = [(8, 8), (4, 4)]
    query = torch.randn(2, 20, 32)
    source = torch.randn(2, 80, 32)
    reference_points = torch.rand(2, 20, 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(query, reference_points, source, shapes)
    ((value, shapes, locations, weights, out),) = calls
    assert {value.dtype, locations.dtype, weights.dtype, out.dtype} == {torch.float32}
    fp32 = reference(value.double(), shapes, locations.double(), weights.double())
    torch.testing.assert_close(out.double(), fp32, rtol=0, atol=1e-6)
    half = reference(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())
    assert (half.double() - fp32).abs().max() > 1e-3


def test_deformable_pixel_decoder_is_float32_under_autocast():
    """The whole deformable encoder + FPN gives the fp32 outputs to 1e-6 under autocast."""
    channels = {"res2": 16, "res3": 24, "res4": 32, "res5": 40}
    shapes = {
        k: ShapeSpec(channels=c, stride=4 * 2**i) for i, (k, c) in enumerate(channels.items())
    }
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(
        shapes,
        transformer_dropout=0.0,
        transformer_nheads=4,
        transformer_dim_feedforward=32,
        transformer_enc_layers=1,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["res3", "res4", "res5"],
        common_stride=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    features = {
        k: torch.randn(1, c, 64 // (4 * 2**i), 64 // (4 * 2**i), generator=g)
        for i, (k, c) in enumerate(channels.items())
    }
    with torch.no_grad():
        fp32 = decoder.forward_features(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = decoder.forward_features(features)
        rounded = {k: v.bfloat16().float() for k, v in features.items()}
        half_inputs = decoder.forward_features(rounded)
    for a, b in zip([amp[0], amp[1], *amp[2]], [fp32[0], fp32[1], *fp32[2]]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # bfloat16 rounding of the inputs alone already exceeds the tolerance
    assert (half_inputs[0] - fp32[0]).abs().max() > 1e-4


def test_semask_semantic_attention_runs_in_float32_under_autocast():
    from semask.backbone import SemanticAttention

    torch.manual_seed(0)
    block = SemanticAttention(dim=16, num_classes=11, proj_drop=0.0)
    with torch.no_grad():
        nn.init.normal_(block.mlp_res.weight, std=0.1)
        block.gamma.fill_(0.5)
    x = torch.randn(2, 9, 16) * 3
    ref_map, ref_out = block(x)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            seg_map, out = block(x)
        assert seg_map.dtype == torch.float32 and out.dtype == torch.float32
        torch.testing.assert_close(seg_map, ref_map, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    # A model cast to bfloat16 as a whole still runs (weights follow the widened input).
    half_map, half_out = copy.deepcopy(block).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half_out.dtype == torch.bfloat16 and torch.isfinite(half_out.float()).all()
    # The same attention computed in bfloat16 is far off: the tolerance above discriminates.
    w = {n: p.to(torch.bfloat16) for n, p in block.named_parameters()}
    xb = x.to(torch.bfloat16)
    q = F.linear(xb, w["mlp_cls_q.weight"], w["mlp_cls_q.bias"])
    k = F.linear(xb, w["mlp_cls_k.weight"], w["mlp_cls_k.bias"])
    v = F.linear(xb, w["mlp_v.weight"], w["mlp_v.bias"])
    feats = F.linear(
        F.scaled_dot_product_attention(q, k, v, scale=1.0),
        w["mlp_res.weight"],
        w["mlp_res.bias"],
    )
    out_bf16 = xb + w["gamma"] * feats
    assert (out_bf16.float() - ref_out).abs().max() > 1e-3
