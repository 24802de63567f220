"""Weights kept in the autocast dtype between low-precision inference forwards."""

import contextlib
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["LowPrecisionWeights", "WEIGHT_LAYERS"]

# Layers whose weights autocast casts to its low-precision dtype when they run under it (their
# forward is one autocast operator: linear or convolution).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Copy(NamedTuple):
    """One parameter's low-precision copy and what it was made from."""

    # the parameter's tensor when copied: shares its storage (which therefore cannot be reused by
    # another tensor while the copy is kept) and its version counter
    source: torch.Tensor
    version: int  # the source's version then
    copy: torch.Tensor
    copy_with_grad_flag: torch.Tensor  # the same copy, requiring grad as its parameter does


class LowPrecisionWeights:
    """
    ``module(*args)`` with the float32 weights of the layers that run under an autocast to
    ``dtype`` replaced by copies in ``dtype``, made once and kept between calls.

    At every forward under autocast, each such layer's float32 weight and bias are cast to the
    autocast dtype (autocast's own cache lasts one autocast region): for a Swin-T Mask2Former in
    bfloat16 on CPU, 43.5 M parameters read and written at every image. Handing the layers the
    same casts made once gives the same results (autocast rounds the same way) without that pass.

    The first call runs ``module`` unchanged and records which ``WEIGHT_LAYERS`` ran, and whether
    each ran under an autocast to ``dtype`` (layers that run outside autocast, e.g. a backbone's
    first convolution kept in float32, keep their weights); later calls substitute the copies
    through ``torch.func.functional_call``. A copy is remade when its parameter's values may have
    changed: another storage (``param.data = ...``, a move to another device) or an in-place
    update (optimizer step, ``load_state_dict``, an EMA swap: the tensor's version counter).

    The copies are handed out as autocast hands out its casts, so that the outputs are the
    same bit for bit: under ``torch.no_grad`` a cast of a parameter that requires grad requires
    grad too (not under ``torch.inference_mode``), and PyTorch picks a linear layer's route by
    it (with a strided input: one product with the bias added inside it, or a batched product
    and the bias added in the low precision).

    For calls without gradients only: the copies are not connected to the parameters. Memory:
    the copies (half the float32 size of the substituted weights in bfloat16 / float16).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module = module
        self.dtype = dtype
        # parameter names substituted; None until the first call has recorded them
        self.names: Optional[Tuple[str, ...]] = None
        self._copies: Dict[str, _Copy] = {}

    def __call__(self, *args):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "LowPrecisionWeights runs without gradients only (torch.no_grad / inference_mode)"
            )
        if self.names is None:
            with self._recording():
                return self.module(*args)
        return functional_call(self.module, self.weights(), args)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Within, the forwards of ``module``'s ``WEIGHT_LAYERS`` are noted with whether an
        autocast to ``dtype`` was active on their weights' device; on exit, the float32
        parameters of the layers that only ran under it (and are not shared with a layer that
        ran outside it) become ``names``."""
        under: Dict[nn.Module, set] = {}

        def note(layer, inputs):
            device_type = layer.weight.device.type
            active = torch.is_autocast_enabled(device_type) and (
                torch.get_autocast_dtype(device_type) == self.dtype
            )
            under.setdefault(layer, set()).add(active)

        layers = [m for m in self.module.modules() if isinstance(m, WEIGHT_LAYERS)]
        handles = [layer.register_forward_pre_hook(note) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        outside = {
            id(p) for layer, states in under.items() if False in states for p in layer.parameters()
        }
        names = []
        for prefix, layer in self.module.named_modules(remove_duplicate=False):
            if under.get(layer) != {True}:
                continue
            for name, param in layer.named_parameters(recurse=False):
                if param.dtype == torch.float32 and id(param) not in outside:
                    names.append(f"{prefix}.{name}" if prefix else name)
        self.names = tuple(dict.fromkeys(names))

    def weights(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> its copy in ``dtype`` (remade where the parameter changed)."""
        weights = {}
        params = dict(self.module.named_parameters(remove_duplicate=False))
        as_grad_mode_casts = not torch.is_inference_mode_enabled()
        for name in self.names:
            param = params[name]
            kept = self._copies.get(name)
            if (
                kept is None
                or kept.source.data_ptr() != param.data_ptr()
                or kept.source.device != param.device
                or kept.version != param._version
            ):
                with torch.inference_mode(False), torch.no_grad():
                    copy = param.detach().to(self.dtype)
                    flagged = copy.detach().requires_grad_(param.requires_grad)
                    kept = _Copy(param.detach(), param._version, copy, flagged)
                self._copies[name] = kept
            weights[name] = kept.copy_with_grad_flag if as_grad_mode_casts else kept.copy
        return weights
