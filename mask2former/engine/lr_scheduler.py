"""LR schedules whose checkpoints hold progress, not configuration.

Detectron2's / DeepLab's schedulers save every attribute in their state dict, so resuming a run
with a larger ``SOLVER.MAX_ITER`` (to train longer) restores the old length and the poly
schedule goes past its end (``math domain error``). Here the configured shape of the schedule
always comes from the current config; only the position (``last_epoch``, ...) is restored.
"""

from typing import List

import torch
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler

__all__ = ["ResumableWarmupPolyLR", "build_lr_scheduler"]


class ResumableWarmupPolyLR(WarmupPolyLR):
    """DeepLab's warm-up + poly schedule, ``lr = base * warmup * (1 - it / max_iters) ** power``
    (never below ``constant_ending`` if set), that follows the current config after a resume."""

    CONFIG_FIELDS = (
        "max_iters",
        "warmup_factor",
        "warmup_iters",
        "warmup_method",
        "power",
        "constant_ending",
    )

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k not in self.CONFIG_FIELDS}

    def load_state_dict(self, state_dict):
        super().load_state_dict(
            {k: v for k, v in state_dict.items() if k not in self.CONFIG_FIELDS}
        )

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
