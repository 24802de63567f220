"""Mixed-precision training step in float16 (with loss scaling) or bfloat16."""

import time

import torch
from detectron2.engine import SimpleTrainer

# SOLVER.AMP.PRECISION values and their autocast dtypes.
AMP_PRECISIONS = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def amp_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a ``SOLVER.AMP.PRECISION`` value."""
    if precision not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be one of {sorted(AMP_PRECISIONS)}, got {precision!r}"
        )
    return AMP_PRECISIONS[precision]


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under ``torch.autocast``.

    float16 gradients are computed on a dynamically scaled loss (``GradScaler``; steps whose
    gradients hold inf/NaN are skipped); bfloat16 has the exponent range of float32 and needs no
    scaling. The autocast device is the model's. Works with detectron2 0.6 and upstream (whose
    ``AMPTrainer`` has a precision argument that 0.6 lacks).
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.float16):
        super().__init__(model, data_loader, optimizer)
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(f"precision must be torch.float16 or torch.bfloat16, got {precision}")
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = torch.amp.GradScaler(
            self.device_type, enabled=precision == torch.float16
        )

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("MixedPrecisionTrainer: the model was switched to eval mode")
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        # Unscale before the step, so that gradient clipping (full-model or per-parameter) sees
        # the true gradients with every optimizer: GradScaler.step leaves the unscaling of the
        # fused AdamW to its kernel, after the clipping would have run on scaled gradients.
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
