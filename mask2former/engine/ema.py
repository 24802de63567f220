"""Exponential moving average (EMA) of the model weights.

``ModelEMA`` keeps float32 shadow copies of every entry of the (unwrapped) model's state dict and
moves them toward the current weights after each optimizer step::

    shadow = d_t * shadow + (1 - d_t) * weight,   d_t = DECAY * (1 - exp(-t / WARMUP_ITERS))

where ``t`` counts the updates (1 for the first one). The warm-up keeps the early average from
being dominated by the initial weights; ``WARMUP_ITERS = 0`` uses ``DECAY`` from the first update.

Two hooks use it in training: ``EMAHook`` updates it after every step (placed before the periodic
checkpointer, so a checkpoint of iteration N holds the EMA of iteration N under the ``ema`` key,
which ``--resume`` restores) and writes ``model_final_ema.pth`` with the final checkpoint;
``EMAEvalHook`` evaluates the EMA weights whenever the raw weights are evaluated (placed after the
raw evaluation), storing its scalars under an ``ema/`` prefix.

With several processes each rank updates its own EMA from its own model. DDP keeps the parameters
identical on every rank, hence their averages too; buffers are as identical as the model's own
(BatchNorm statistics differ across ranks without SyncBN, exactly as in the raw model).
"""

import logging
import math
import os
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
from detectron2.config import configurable
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..utils.io import atomic_write
from .checkpoint import read_checkpoint

logger = logging.getLogger(__name__)

#: File written next to ``model_final.pth`` at the end of training: the EMA weights as a plain
#: model checkpoint (``MODEL.WEIGHTS`` / ``--weights`` load it like any other).
FINAL_EMA_CHECKPOINT = "model_final_ema.pth"

_BUFFER_MODES = ("average", "copy")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or ``model`` itself."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    return model


def _model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors of the unwrapped model's state dict (parameters and persistent buffers)."""
    return unwrap_model(model).state_dict(keep_vars=True)


class ModelEMA:
    """Float32 exponential moving average of a model's state dict.

    Floating-point parameters are averaged; floating-point buffers are averaged or copied
    (``buffers``); other entries (integer indices, counters) are copied. The shadow tensors live
    on the model's devices. ``state_dict()`` / ``load_state_dict()`` make it a checkpointable.
    """

    @configurable
    def __init__(
        self, model: nn.Module, *, decay: float, warmup_iters: float = 0.0, buffers: str = "average"
    ):
        """
        Args:
            model: the (possibly DDP-wrapped) model; the EMA starts from its current weights.
            decay: the EMA decay once warmed up, in [0, 1).
            warmup_iters: time constant (in updates) of the decay warm-up; 0 disables it.
            buffers: "average" (floating-point buffers averaged like the parameters) or "copy"
                (they follow the model's current values).
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in [0, 1), got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"SOLVER.EMA.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"SOLVER.EMA.BUFFERS must be one of {_BUFFER_MODES}, got {buffers!r}")
        self.decay = float(decay)
        self.warmup_iters = float(warmup_iters)
        self.buffers = buffers
        self.num_updates = 0
        # True once load_state_dict() restored a saved EMA (training then continues it).
        self.restored = False
        self.shadow: Dict[str, torch.Tensor] = {}
        self._averaged: Dict[str, bool] = {}
        self._dtypes: Dict[str, torch.dtype] = {}
        self.reset(model)

    @classmethod
    def from_config(cls, cfg, model):
        return {
            "model": model,
            "decay": cfg.SOLVER.EMA.DECAY,
            "warmup_iters": cfg.SOLVER.EMA.WARMUP_ITERS,
            "buffers": cfg.SOLVER.EMA.BUFFERS,
        }

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from the model's current weights (no update counted)."""
        tensors = _model_tensors(model)
        param_names = {name for name, _ in unwrap_model(model).named_parameters()}
        self.shadow, self._averaged, self._dtypes = {}, {}, {}
        for name, t in tensors.items():
            floating = t.is_floating_point()
            self._dtypes[name] = t.dtype
            self._averaged[name] = floating and (name in param_names or self.buffers == "average")
            self.shadow[name] = t.detach().to(torch.float32 if floating else t.dtype, copy=True)
        self.num_updates = 0
        self.restored = False

    def decay_at(self, num_updates: int) -> float:
        """The decay used by update number ``num_updates`` (1 for the first update)."""
        if self.warmup_iters <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-num_updates / self.warmup_iters))

    def _matching_tensors(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        tensors = _model_tensors(model)
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())
            unexpected = sorted(tensors.keys() - self.shadow.keys())
            raise ValueError(
                f"the model does not match its EMA: EMA entries missing from the model "
                f"{missing[:5]}, model entries without EMA {unexpected[:5]}"
            )
        return tensors

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward the model's current weights."""
        tensors = self._matching_tensors(model)
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        averaged = [name for name in tensors if self._averaged[name]]
        if averaged:
            torch._foreach_lerp_(
                [self.shadow[n] for n in averaged],
                [tensors[n].detach().to(torch.float32) for n in averaged],
                weight,
            )
        for name, t in tensors.items():
            if not self._averaged[name]:
                self.shadow[name].copy_(t.detach())

    def state_dict(self) -> dict:
        """Plain data (tensors, numbers, a string): the shadow tensors are not copied."""
        return {
            "shadow": dict(self.shadow),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup_iters": self.warmup_iters,
            "buffers": self.buffers,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a saved EMA (its tensors copied onto the current shadow's devices)."""
        if not isinstance(state, dict) or not {"shadow", "num_updates"} <= state.keys():
            raise ValueError("the 'ema' entry of the checkpoint is not a saved ModelEMA state")
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - saved.keys())
            unexpected = sorted(saved.keys() - self.shadow.keys())
            raise ValueError(
                f"the checkpoint's EMA does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, value in saved.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(
                    f"the checkpoint's EMA of {name} has shape {tuple(value.shape)}, the model "
                    f"{tuple(self.shadow[name].shape)}"
                )
        for name, value in saved.items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
        changed = {
            k: (state[k], getattr(self, k))
            for k in ("decay", "warmup_iters", "buffers")
            if k in state and state[k] != getattr(self, k)
        }
        if changed:
            logger.info(
                "EMA restored with the configured settings instead of the saved ones: %s",
                ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
            )
        self.restored = True

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA weights in the model's own dtypes, on the CPU (a model state dict)."""
        return {
            name: t.detach().to("cpu", self._dtypes[name], copy=True)
            for name, t in self.shadow.items()
        }

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights; on exit (also on an exception) its
        own weights are put back exactly (bit for bit, from a copy taken on entry)."""
        tensors = self._matching_tensors(model)
        backup = {name: t.detach().clone() for name, t in tensors.items()}
        try:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(self.shadow[name])
            yield model
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(backup[name])


def _save_model_checkpoint(weights: Dict[str, torch.Tensor], iteration, path: str) -> None:
    data = {"model": weights, "iteration": iteration}
    with atomic_write(path) as f:
        torch.save(data, f)


def save_ema_weights(ema: ModelEMA, path: str, iteration: Optional[int] = None) -> None:
    """Write the EMA weights as a plain model checkpoint (``{"model": ..., "iteration": ...}``),
    atomically."""
    _save_model_checkpoint(ema.model_state_dict(), iteration, path)


def export_ema_weights(checkpoint_file: str, output_file: str) -> None:
    """Write the ``ema`` entry of a training checkpoint (e.g. ``model_0004999.pth``) as a plain
    model checkpoint that ``MODEL.WEIGHTS`` / ``--weights`` load like any other."""
    checkpoint = read_checkpoint(checkpoint_file)  # data only; errors name the file
    if "ema" not in checkpoint:
        raise ValueError(f"{checkpoint_file}: no 'ema' entry (trained without SOLVER.EMA.ENABLED?)")
    shadow = checkpoint["ema"].get("shadow") if isinstance(checkpoint["ema"], dict) else None
    if not isinstance(shadow, dict):
        raise ValueError(f"{checkpoint_file}: the 'ema' entry is not a saved ModelEMA state")
    model = checkpoint["model"]
    weights = {
        name: t.to(model[name].dtype) if isinstance(model.get(name), torch.Tensor) else t
        for name, t in shadow.items()
    }
    _save_model_checkpoint(weights, checkpoint.get("iteration"), output_file)


class EMAHook(HookBase):
    """Updates the EMA after every step and makes it part of the trainer's checkpoints.

    Register it before the periodic checkpointer: the checkpoint of an iteration then holds the
    EMA including that iteration's update, which is what ``--resume`` continues from. The EMA is
    (re)started from the model's weights in ``before_train`` (after ``MODEL.WEIGHTS`` or the
    resumed checkpoint were loaded) unless the resumed checkpoint held an EMA.
    """

    def __init__(self, ema: ModelEMA, checkpointer, output_dir: str):
        """
        Args:
            ema: the state; registered with ``checkpointer`` under the key ``ema``.
            checkpointer: the trainer's checkpointer (fvcore ``Checkpointer``).
            output_dir: where ``model_final_ema.pth`` is written at the end of training.
        """
        self.ema = ema
        self.output_dir = output_dir
        checkpointer.add_checkpointable("ema", ema)

    def before_train(self):
        if self.ema.restored:
            logger.info(
                "EMA of the weights restored from the checkpoint (%d updates)", self.ema.num_updates
            )
        else:
            self.ema.reset(self.trainer.model)
            logger.info(
                "EMA of the weights started from the current weights (decay %g, warm-up "
                "%g iterations, buffers %s)",
                self.ema.decay,
                self.ema.warmup_iters,
                self.ema.buffers,
            )

    def after_step(self):
        self.ema.update(self.trainer.model)
        if self.trainer.iter + 1 >= self.trainer.max_iter and comm.is_main_process():
            path = os.path.join(self.output_dir, FINAL_EMA_CHECKPOINT)
            save_ema_weights(self.ema, path, iteration=self.trainer.iter)
            logger.info("EMA weights (%d updates) written to %s", self.ema.num_updates, path)


class EMAEvalHook(HookBase):
    """Evaluates the EMA weights at the iterations where Detectron2's ``EvalHook`` evaluates the
    raw ones (every ``eval_period`` iterations and after the last one).

    ``eval_function`` runs on every rank (as the raw evaluation: it is distributed) with the EMA
    weights swapped into the trainer's model; the raw weights are restored exactly afterwards.
    Its results go to the trainer's storage with an ``ema/`` prefix (``ema/sem_seg/mIoU``).
    Register it after the raw ``EvalHook`` and the hooks reading its results, before the writers.
    """

    def __init__(self, ema: ModelEMA, eval_period: int, eval_function):
        self.ema = ema
        self._period = eval_period
        self._func = eval_function

    def _do_eval(self):
        logger.info(
            "Evaluating the EMA weights (%d updates, current decay %.6f)",
            self.ema.num_updates,
            self.ema.decay_at(max(self.ema.num_updates, 1)),
        )
        with self.ema.applied_to(self.trainer.model):
            results = self._func()
        if results:
            flat = {}
            for key, value in flatten_results_dict(results).items():
                try:
                    flat["ema/" + key] = float(value)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"EMA evaluation returned a non-number {key}: {value!r}"
                    ) from e
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        comm.synchronize()

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0:
            if next_iter != self.trainer.max_iter:  # the last evaluation is in after_train
                self._do_eval()

    def after_train(self):
        # as EvalHook: only after a complete training (not after a failure)
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._do_eval()
        del self._func
