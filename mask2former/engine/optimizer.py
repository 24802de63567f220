"""Optimizer of the Mask2Former recipe: AdamW/SGD with per-parameter hyper-parameters
(backbone LR multiplier, no weight decay on norms / ``nn.Embedding`` modules / Swin position tables;
plain parameters such as the pixel decoder's ``level_embed`` keep ``SOLVER.WEIGHT_DECAY``) and
optional gradient clipping over the full model (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"``).

AdamW runs PyTorch's fused implementation (one kernel per parameter on CPU and CUDA) where every
parameter allows it: the same update within float rounding as the default one, whose half-dozen
element-wise passes per parameter cost about as much as a third of a CPU training step of
Swin-T Mask2Former.
"""

import itertools
import logging
from typing import Any, Dict, List, Set

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

# Normalisation layers whose parameters get SOLVER.WEIGHT_DECAY_NORM.
NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)

# Parameter names (last component) that are never weight-decayed: Swin's position tables, as in
# the official recipe (DiNAT's ``rpb`` keeps weight decay there too).
NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def get_param_groups(cfg, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """One parameter group per parameter, with its lr and weight decay (the official scheme)."""
    base_lr = cfg.SOLVER.BASE_LR
    groups: List[Dict[str, Any]] = []
    seen: Set[torch.nn.Parameter] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = base_lr
            weight_decay = cfg.SOLVER.WEIGHT_DECAY
            if "backbone" in module_name.split("."):
                lr = lr * cfg.SOLVER.BACKBONE_MULTIPLIER
            if name in NO_DECAY_PARAM_NAMES:
                weight_decay = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_EMBED
            groups.append({"params": [param], "lr": lr, "weight_decay": weight_decay})
    return groups


def total_gradient_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` taken together (a 0-dim tensor).

    float32 / float64 gradients on CPU: the square root of the sum of each gradient's dot
    product with itself, one BLAS pass per gradient (Swin-T Mask2Former's 469 gradients: 8.7 ms
    against 14.8 ms for ``torch.nn.utils.get_total_norm``'s per-tensor norms on the README's
    2-core machine, and closer to the float64 norm, relative error 2e-7 against 8e-6, the dot
    products summing in blocks). Elsewhere (GPUs: one fused kernel; half precision)
    ``get_total_norm``.
    """
    dtype = grads[0].dtype if grads else None
    if dtype in (torch.float32, torch.float64) and all(
        g.device.type == "cpu" and g.dtype == dtype for g in grads
    ):
        flat = [g.reshape(-1) for g in grads]
        return torch.stack([torch.dot(f, f) for f in flat]).sum().sqrt()
    return torch.nn.utils.get_total_norm(grads)


def add_full_model_gradient_clipping(optim_cls, clip_norm: float):
    """Subclass ``optim_cls`` so that ``step`` first clips the global grad norm of all params.

    As ``torch.nn.utils.clip_grad_norm_``: the gradients are multiplied by
    ``min(1, clip_norm / (total norm + 1e-6))``. With PyTorch's fused AdamW the factor is handed
    to the fused kernel, which divides each gradient by its reciprocal while it reads it for the
    update (its ``grad_scale``, the hook loss scaling uses) and writes the clipped gradient back,
    instead of a separate pass over all gradients (the update is memory-bound: that pass was
    about a seventh of the optimizer's time in a CPU training step). The clipped gradients and
    the update are the same up to float rounding.
    """

    class FullModelGradientClippingOptimizer(optim_cls):
        def _clips_in_fused_kernel(self) -> bool:
            # a grad_scale set by a GradScaler that did not unscale first: clip separately
            return bool(self.defaults.get("fused")) and getattr(self, "grad_scale", None) is None

        def step(self, closure=None):
            params = list(itertools.chain(*[g["params"] for g in self.param_groups]))
            if not self._clips_in_fused_kernel():
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
                return super().step(closure=closure)
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return super().step(closure=closure)
            total_norm = total_gradient_norm(grads)
            factor = torch.clamp(clip_norm / (total_norm + 1e-6), max=1.0)
            had_attribute = hasattr(self, "grad_scale")
            self.grad_scale = factor.reciprocal()
            try:
                return super().step(closure=closure)
            finally:
                if had_attribute:
                    self.grad_scale = None
                else:
                    del self.grad_scale

    FullModelGradientClippingOptimizer.__name__ = f"FullModelGradientClipping{optim_cls.__name__}"
    return FullModelGradientClippingOptimizer


# Devices with a fused AdamW kernel in PyTorch.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(groups: List[Dict[str, Any]]) -> bool:
    """Whether PyTorch's fused AdamW takes every parameter of ``groups``: floating point, all on
    one device type that has the kernel."""
    params = [p for g in groups for p in g["params"]]
    device_types = {p.device.type for p in params}
    return (
        len(device_types) == 1
        and device_types <= set(FUSED_ADAMW_DEVICES)
        and all(p.is_floating_point() for p in params)
    )


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.SOLVER`` for ``model``."""
    groups = get_param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    elif name == "ADAMW":
        fused = fused_adamw_supported(groups)
        if not fused:
            devices = sorted({str(p.device) for g in groups for p in g["params"]})
            logging.getLogger(__name__).warning(
                "AdamW: PyTorch's fused kernel does not take these parameters (devices %s); "
                "using its per-parameter implementation, which is slower",
                devices,
            )
        optim_cls, kwargs = torch.optim.AdamW, {"fused": fused}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE)
        optimizer = optim_cls(groups, cfg.SOLVER.BASE_LR, **kwargs)
    else:
        # "value" / "norm" clipping per parameter, as in Detectron2.
        optimizer = maybe_add_gradient_clipping(cfg, optim_cls)(
            groups, cfg.SOLVER.BASE_LR, **kwargs
        )
    return optimizer
