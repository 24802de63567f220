"""LR schedules whose checkpoints hold progress, not configuration.

Detectron2's / DeepLab's schedulers save every attribute in their state dict, so resuming a run
with a larger ``SOLVER.MAX_ITER`` (to train longer) restores the old length and the poly
schedule goes past its end (``math domain error``), and a changed ``SOLVER.BASE_LR`` is replaced
by the old ``base_lrs``. Here the configured shape of the schedule and its base rates always come
from the current config; only the position (``last_epoch``, ...) is restored.
"""

from typing import List

import torch
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler

__all__ = ["ResumableWarmupPolyLR", "build_lr_scheduler"]


class ResumableWarmupPolyLR(WarmupPolyLR):
    """DeepLab's warm-up + poly schedule, ``lr = base * warmup * (1 - it / max_iters) ** power``
    (never below ``constant_ending`` if set), that follows the current config after a resume.

    The base rates are those of the optimizer it is built with (``SOLVER.BASE_LR`` times each
    parameter group's multiplier), never the checkpoint's. The optimizer's own state, loaded after
    the scheduler's on resume, brings back the old rates: :meth:`apply_lr` sets the rates of the
    restored position again.
    """

    CONFIG_FIELDS = (
        "max_iters",
        "warmup_factor",
        "warmup_iters",
        "warmup_method",
        "power",
        "constant_ending",
    )
    # the base rates of the current config, and the last rates computed from them
    RATE_FIELDS = ("base_lrs", "_last_lr")

    def state_dict(self):
        skip = self.CONFIG_FIELDS + self.RATE_FIELDS
        return {k: v for k, v in super().state_dict().items() if k not in skip}

    def load_state_dict(self, state_dict):
        skip = self.CONFIG_FIELDS + self.RATE_FIELDS
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in skip})
        self.apply_lr()

    def apply_lr(self) -> None:
        """Set the optimizer's rates (and ``initial_lr``) to those of the current position."""
        lrs = self.get_lr()
        for group, base_lr, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs):
            group["initial_lr"] = base_lr
            group["lr"] = lr
        self._last_lr = lrs

    def get_lr(self) -> List[float]:
        if self.last_epoch >= self.max_iters:
            factor = self.constant_ending
            return [base_lr * factor for base_lr in self.base_lrs]
        return super().get_lr()


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """``SOLVER.LR_SCHEDULER_NAME`` "WarmupPolyLR" (this module) or any Detectron2 schedule."""
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
        return ResumableWarmupPolyLR(
            optimizer,
            cfg.SOLVER.MAX_ITER,
            warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
            warmup_iters=cfg.SOLVER.WARMUP_ITERS,
            warmup_method=cfg.SOLVER.WARMUP_METHOD,
            power=cfg.SOLVER.POLY_LR_POWER,
            constant_ending=cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
        )
    return build_d2_lr_scheduler(cfg, optimizer)
