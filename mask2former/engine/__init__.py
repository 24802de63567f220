"""Trainer, optimizer and config set-up."""
from .optimizer import build_optimizer, get_param_groups
from .setup import build_cfg, get_project_cfg
from .trainer import Trainer

__all__ = ["Trainer", "build_cfg", "build_optimizer", "get_param_groups", "get_project_cfg"]
