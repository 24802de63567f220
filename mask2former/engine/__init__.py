"""Trainer, optimizer, config set-up, checkpointing and start-up checks."""

from .checkpoint import (
    CheckpointFileError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    SafeCheckpointer,
    UnsafeCheckpointError,
)
from .checks import check_num_classes, run_training_checks
from .cpu_runtime import setup_cpu_runtime
from .ema import EMAEvalHook, EMAHook, ModelEMA, export_ema_weights
from .launch import launch
from .optimizer import build_optimizer, get_param_groups
from .setup import build_cfg, get_project_cfg
from .trainer import Trainer

__all__ = [
    "CheckpointFileError",
    "CorruptCheckpointError",
    "EMAEvalHook",
    "EMAHook",
    "IncompleteCheckpointError",
    "ModelEMA",
    "SafeCheckpointer",
    "Trainer",
    "UnsafeCheckpointError",
    "build_cfg",
    "build_optimizer",
    "check_num_classes",
    "export_ema_weights",
    "get_param_groups",
    "get_project_cfg",
    "launch",
    "run_training_checks",
    "setup_cpu_runtime",
]
