"""Convert an official DiNAT (or NAT) ImageNet checkpoint into Detectron2 backbone weights.

The official classification checkpoints (SHI-Labs/Neighborhood-Attention-Transformer,
``classification/``) hold the model's state dict, possibly wrapped in ``{"model": ...}`` or
``{"state_dict": ...}``. The backbone uses the same parameter names, so conversion only drops the
classifier (``head.*``) and the final norm (``norm.*``; the Detectron2 backbone has one norm per
output level instead, ``norm0..norm3``, which stay randomly initialised) and prefixes every name
with ``backbone.``. The result ``{"model": {"backbone.<name>": tensor}}`` loads with
``MODEL.WEIGHTS``.

The official DiNAT-L classification models (``dinat_large_*``, ImageNet-22k with 21841 classes
and the ImageNet-1k fine-tunes) have 6/12/24/48 heads, the same as the Mask2Former DiNAT-L config,
so their ``rpb`` tables ``[heads, 2k-1, 2k-1]`` load as well. They fit when the kernel size
matches: the ``*_11x11interp`` / ``*_11x11`` checkpoints for ``KERNEL_SIZE 11`` (the project's
DiNAT-L config), the others for kernel 7. A kernel-7 table in a kernel-11 model does not fit
(Detectron2's checkpointer would skip it with a shape-mismatch warning) unless the conversion is
given the target ``kernel_size``: the tables are then resized bicubically, the interpolation the
official ``*_11x11interp`` checkpoint was made with.
"""

import pickle
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mask2former.utils.io import atomic_write

__all__ = [
    "convert_dinat_checkpoint",
    "convert_dinat_state_dict",
    "interpolate_rpb",
    "load_dinat_state_dict",
]

# Parameters every DiNAT/NAT checkpoint has (conv tokenizer, first attention block).
_REQUIRED_KEYS = ("patch_embed.proj.0.weight", "levels.0.blocks.0.attn.qkv.weight")
# Classification-only parameters, not part of the backbone.
_DROPPED_PREFIXES = ("head.", "norm.")


def load_dinat_state_dict(path: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """Read the state dict of an official DiNAT checkpoint file.

    Args:
        path: ``.pth`` file.
        trusted: unpickle arbitrary Python objects (e.g. training checkpoints that also store
            their argparse namespace). Only for files you trust; by default only tensors and plain
            containers are loaded.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: holds Python objects other than tensors; if you trust the file, convert it "
            f"with --trusted. ({e})"
        ) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a DiNAT checkpoint (no state dict of tensors found).")
    return obj


def interpolate_rpb(rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Resize a relative positional bias ``[heads, 2k-1, 2k-1]`` to ``kernel_size`` (bicubic,
    ``align_corners=False``: the zero offset in the centre keeps its value)."""
    if rpb.dim() != 3 or rpb.shape[1] != rpb.shape[2] or rpb.shape[1] % 2 == 0:
        raise ValueError(f"an rpb table is [heads, 2k-1, 2k-1], got {tuple(rpb.shape)}")
    side = 2 * kernel_size - 1
    if rpb.shape[1] == side:
        return rpb
    resized = F.interpolate(rpb.float()[None], size=(side, side), mode="bicubic")
    return resized[0].to(rpb.dtype).contiguous()


def convert_dinat_state_dict(
    state: Dict[str, torch.Tensor], source: str = "state dict", kernel_size: Optional[int] = None
):
    """Official DiNAT state dict -> ``({"backbone.<name>": tensor}, dropped names)``; with
    ``kernel_size``, every ``rpb`` table is resized to it (:func:`interpolate_rpb`)."""
    if any(name.startswith("backbone.") for name in state):
        raise ValueError(
            f"{source}: already a Detectron2 checkpoint (names start with 'backbone.'); "
            "load it directly."
        )
    missing = [name for name in _REQUIRED_KEYS if name not in state]
    if missing:
        raise ValueError(
            f"{source}: not an official DiNAT/NAT checkpoint: missing {missing} "
            f"(first names: {sorted(state)[:5]})."
        )
    converted, dropped = {}, []
    for name, tensor in state.items():
        if name.startswith(_DROPPED_PREFIXES):
            dropped.append(name)
            continue
        if kernel_size is not None and name.endswith(".attn.rpb"):
            tensor = interpolate_rpb(tensor, kernel_size)
        converted["backbone." + name] = tensor
    return converted, dropped


def convert_dinat_checkpoint(
    src: str, dst: str, trusted: bool = False, kernel_size: Optional[int] = None
) -> Tuple[int, list]:
    """Convert the checkpoint file ``src`` and write ``{"model": ...}`` to ``dst`` atomically
    (``kernel_size``: see :func:`convert_dinat_state_dict`).

    Returns ``(number of converted tensors, dropped names)``.
    """
    converted, dropped = convert_dinat_state_dict(
        load_dinat_state_dict(src, trusted), source=src, kernel_size=kernel_size
    )
    with atomic_write(dst, "wb") as f:
        torch.save({"model": converted}, f)
    return len(converted), dropped
