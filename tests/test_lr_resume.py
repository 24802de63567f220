"""A changed SOLVER.BASE_LR is honoured on resume: the schedule keeps only its position."""

import pytest
import torch
from torch import nn

from mask2former.engine import get_project_cfg
from mask2former.engine.lr_scheduler import build_lr_scheduler


def _cfg(base_lr):
    cfg = get_project_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.BASE_LR = base_lr
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    return cfg


def _optimizer(params, base_lr):
    # two groups, the second with a 0.1 multiplier (as the backbone's)
    return torch.optim.AdamW(
        [{"params": [params[0]], "lr": base_lr}, {"params": [params[1]], "lr": base_lr * 0.1}]
    )


def test_new_base_lr_after_scheduler_and_optimizer_round_trip():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = _optimizer(params, 1e-3)
    sched = build_lr_scheduler(_cfg(1e-3), opt)
    for _ in range(4):
        params[0].grad = torch.ones(2)
        params[1].grad = torch.ones(2)
        opt.step()
        sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    assert "base_lrs" not in state["scheduler"]

    # resume with BASE_LR 1e-2, loading in the trainer's order: scheduler, then optimizer
    opt2 = _optimizer(params, 1e-2)
    sched2 = build_lr_scheduler(_cfg(1e-2), opt2)
    sched2.load_state_dict(state["scheduler"])
    opt2.load_state_dict(state["optimizer"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6**0.9)  # the checkpoint's
    sched2.apply_lr()
    factor = (1 - 4 / 10) ** 0.9
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([1e-2 * factor, 1e-3 * factor])
    assert sched2.last_epoch == 4
    opt2.step()
    sched2.step()
    factor = (1 - 5 / 10) ** 0.9
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([1e-2 * factor, 1e-3 * factor])
