"""Optimizer parameter groups, full-model gradient clipping, the resumable poly LR schedule and
the project config composition."""

import functools
import math

import pytest
import torch
from torch import nn

from dinat import add_dinat_config
from mask2former.engine import build_optimizer, get_param_groups, get_project_cfg
from mask2former.engine import setup as engine_setup
from mask2former.engine.lr_scheduler import ResumableWarmupPolyLR, build_lr_scheduler
from mask2former.engine.optimizer import total_gradient_norm
from semask import add_semask_config

# the configuration train_net.py builds: Mask2Former + SeMask + DiNAT keys
build_cfg = functools.partial(
    engine_setup.build_cfg, add_configs=(add_semask_config, add_dinat_config)
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.fc = nn.Linear(4, 4)
        self.backbone.norm = nn.LayerNorm(4)
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.head = nn.Linear(4, 2)
        self.query_feat = nn.Embedding(5, 4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _cfg(**solver):
    cfg = get_project_cfg()
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_param_groups_follow_the_official_scheme():
    model = Toy()
    groups = get_param_groups(_cfg(), model)
    by_param = {id(g["params"][0]): g for g in groups}
    expect = {
        model.backbone.fc.weight: (1e-5, 0.05),
        model.backbone.fc.bias: (1e-5, 0.05),
        model.backbone.norm.weight: (1e-5, 0.0),
        model.backbone.norm.bias: (1e-5, 0.0),
        model.backbone.relative_position_bias_table: (1e-5, 0.0),
        model.head.weight: (1e-4, 0.05),
        model.head.bias: (1e-4, 0.05),
        model.query_feat.weight: (1e-4, 0.0),
    }
    assert len(groups) == len(expect)  # frozen parameters are left out
    for param, (lr, wd) in expect.items():
        group = by_param[id(param)]
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == wd


def test_full_model_gradient_clipping_clips_the_global_norm():
    torch.manual_seed(0)
    model = Toy().double()
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, BACKBONE_MULTIPLIER=1.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    opt = build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    total = math.sqrt(sum(p.numel() * 9.0 for p in params))
    opt.step()
    # clipping rescales the gradients in place: their global norm is now the clip value
    clipped = torch.cat([p.grad.flatten() for p in params])
    assert clipped.norm().item() == pytest.approx(0.01, rel=1e-3) and total > 1.0
    assert torch.allclose(clipped, torch.full_like(clipped, 3.0 * 0.01 / total), rtol=1e-3)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    assert torch.allclose(step.double(), 1e-4 * clipped.double(), rtol=0.2, atol=1e-9)


def test_total_gradient_norm_is_the_float64_norm():
    """Large, small, non-contiguous, 0-dim and empty gradients: within float32 rounding of the
    norm summed in float64; half precision and mixed dtypes through get_total_norm."""
    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(1 << 20, generator=g) * 1e-3,
        torch.randn(300, 257, generator=g).t(),  # non-contiguous
        torch.randn(7, 1, 5, generator=g) * 40.0,
        torch.tensor(2.5),
        torch.empty(0),
    ]
    expected = torch.cat([x.double().flatten() for x in grads]).norm()
    total = total_gradient_norm(grads)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert total.double().item() == pytest.approx(expected.item(), rel=1e-6)
    doubles = [x.double() for x in grads]
    assert total_gradient_norm(doubles).item() == pytest.approx(expected.item(), rel=1e-12)
    halves = [x.bfloat16() for x in grads[1:4]]
    reference = torch.nn.utils.get_total_norm(halves)
    assert torch.equal(total_gradient_norm(halves), reference)
    mixed = [grads[1], grads[2].double()]
    assert torch.equal(total_gradient_norm(mixed), torch.nn.utils.get_total_norm(mixed))


def _adamw_reference(params, grads_per_step, groups, betas=(0.9, 0.999), eps=1e-8):
    """AdamW written out in float64: decoupled decay, bias-corrected moments."""
    values = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(v) for v in values]
    v2 = [torch.zeros_like(v) for v in values]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            lr, wd = groups[i]
            g = g.double()
            values[i] *= 1 - lr * wd
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v2[i] = betas[1] * v2[i] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), v2[i] / (1 - betas[1] ** t)
            values[i] -= lr * m_hat / (v_hat.sqrt() + eps)
    return values


def test_adamw_is_fused_on_cpu_and_matches_the_written_out_update():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(_cfg(), model)
    assert all(g["fused"] for g in opt.param_groups)
    params = [g["params"][0] for g in opt.param_groups]
    hyper = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    steps = [[torch.randn_like(p) for p in params] for _ in range(3)]
    expected = _adamw_reference(params, steps, hyper)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


def _clipped(grads, clip):
    """The gradients times min(1, clip / (global norm + 1e-6)), in float64."""
    grads = [g.double() for g in grads]
    total = torch.cat([g.flatten() for g in grads]).norm()
    return [g * min(1.0, clip / (total.item() + 1e-6)) for g in grads]


@pytest.mark.parametrize("with_grad_scaler", [False, True])
def test_full_model_clipping_in_the_fused_adamw_matches_the_written_out_update(with_grad_scaler):
    """The clip factor goes to the fused kernel: the update of the clipped gradients, and the
    clipped gradients left in ``.grad``, as with a separate clipping pass; also behind a
    GradScaler that unscaled first (the AMP trainer's order)."""
    torch.manual_seed(0)
    model = Toy()
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    opt = build_optimizer(cfg, model)
    assert all(g["fused"] for g in opt.param_groups)
    params = [g["params"][0] for g in opt.param_groups]
    hyper = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    steps = [[torch.randn_like(p) for p in params] for _ in range(3)]
    expected = _adamw_reference(params, [_clipped(grads, 0.01) for grads in steps], hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0) if with_grad_scaler else None
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone() * (8.0 if scaler else 1.0)
        if scaler:
            scaler.scale(torch.zeros(()))  # (what a scaled loss does first: sets the scale up)
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        for got, want in zip([p.grad for p in params], _clipped(grads, 0.01)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
        assert getattr(opt, "grad_scale", None) is None  # nothing left for the next step
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


def test_adamw_falls_back_with_a_warning_off_the_fused_kernels_devices(caplog):
    meta = Toy().to("meta")
    with caplog.at_level("WARNING", logger="mask2former.engine.optimizer"):
        opt = build_optimizer(_cfg(), meta)
    assert not any(g["fused"] for g in opt.param_groups)
    assert "per-parameter implementation" in caplog.text and "meta" in caplog.text


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), Toy())


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_poly_schedule_values_and_resume_with_a_longer_schedule():
    cfg = _cfg(MAX_ITER=10, WARMUP_ITERS=2, WARMUP_FACTOR=0.5, POLY_LR_POWER=0.9)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_lr_scheduler(cfg, opt)
    assert isinstance(sched, ResumableWarmupPolyLR)
    lrs = _lrs(sched, opt, 10)
    for it, lr in enumerate(lrs):
        warm = 1.0 if it >= 2 else 0.5 * (1 - it / 2) + it / 2
        assert lr == pytest.approx(warm * (1 - it / 10) ** 0.9)
    state = sched.state_dict()
    assert "max_iters" not in state and state["last_epoch"] == 10

    cfg.SOLVER.MAX_ITER = 20  # resume and train longer
    opt2 = torch.optim.SGD([param], lr=1.0)
    sched2 = build_lr_scheduler(cfg, opt2)
    sched2.load_state_dict(state)
    assert sched2.max_iters == 20 and sched2.last_epoch == 10
    sched2.step()  # iteration 11
    assert opt2.param_groups[0]["lr"] == pytest.approx((1 - 11 / 20) ** 0.9)
    # past the end the rate stays at the constant ending (0) instead of failing
    sched2.last_epoch = 25
    assert sched2.get_lr() == [0.0]


def test_build_cfg_composes_all_packages_and_disables_amp_on_cpu():
    cfg = build_cfg("configs/m2f_swin_t.yaml", ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED is False  # the YAML enables it for GPUs
    assert (
        cfg.MODEL.SWIN.EMBED_DIM == 96
        and "DINAT" in cfg.MODEL
        and "CATE_WEIGHT" in cfg.MODEL.MASK_FORMER
    )
    assert cfg.is_frozen()
