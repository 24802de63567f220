"""Convert official Swin Transformer ImageNet checkpoints to Detectron2 backbone weights.

An official checkpoint (``swin_tiny_patch4_window7_224.pth`` ...) holds ``{"model": state_dict}``
with the classifier ``head.*``, the final ``norm.*`` and the ``attn_mask`` buffers of the shifted
blocks besides the backbone weights. The conversion keeps the backbone weights under
``backbone.<name>`` (the names of :class:`~.swin.SwinTransformer`), drops the rest, and resizes
the relative position bias tables (bicubic, as the official fine-tuning code) when the target
window size differs from the checkpoint's.
"""

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from ...utils.io import atomic_write
from .swin import relative_position_index

__all__ = [
    "interpolate_relative_position_bias_table",
    "convert_swin_state_dict",
    "load_swin_state_dict",
    "convert_swin_checkpoint",
]

# keys of the classification model that are not part of the backbone
_DROPPED_PREFIXES = ("head.", "norm.")
_DROPPED_SUFFIXES = (".attn_mask",)
_TABLE_SUFFIX = ".attn.relative_position_bias_table"
_INDEX_SUFFIX = ".attn.relative_position_index"


def _table_window_size(num_rows: int) -> int:
    """Window size w of a bias table with (2w - 1)**2 rows."""
    side = math.isqrt(num_rows)
    if side * side != num_rows or side % 2 == 0:
        raise ValueError(f"a relative position bias table has (2w-1)^2 rows, got {num_rows}")
    return (side + 1) // 2


def interpolate_relative_position_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Resize a [(2w-1)^2, heads] bias table to the given window size (bicubic)."""
    old = 2 * _table_window_size(table.shape[0]) - 1
    new = 2 * window_size - 1
    if old == new:
        return table
    grid = table.float().t().reshape(1, -1, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).t().contiguous().to(table.dtype)


def convert_swin_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    window_size: Optional[int] = None,
    prefix: str = "backbone.",
) -> Dict[str, torch.Tensor]:
    """Backbone weights of an official Swin state dict, renamed ``prefix + name``.

    Args:
        state_dict: the ``model`` dict of an official Swin checkpoint.
        window_size: window size of the target model; bias tables (and index buffers) are
            resized when it differs from the checkpoint's. None keeps the checkpoint's.
        prefix: prepended to every name ("backbone." for a Detectron2 meta-architecture).
    """
    if any(name.startswith("backbone.") for name in state_dict):
        raise ValueError(
            "already a Detectron2 checkpoint (names start with 'backbone.'); load it directly"
        )
    has_tables = any(name.endswith(_TABLE_SUFFIX) for name in state_dict)
    if "patch_embed.proj.weight" not in state_dict or not has_tables:
        raise ValueError(
            "not a Swin Transformer state dict (no patch_embed.proj / relative position bias)"
        )
    converted = {}
    for name, value in state_dict.items():
        if name.startswith(_DROPPED_PREFIXES) or name.endswith(_DROPPED_SUFFIXES):
            continue
        if window_size is not None and name.endswith(_TABLE_SUFFIX):
            value = interpolate_relative_position_bias_table(value, window_size)
        elif window_size is not None and name.endswith(_INDEX_SUFFIX):
            value = relative_position_index((window_size, window_size))
        elif name == "absolute_pos_embed" and value.dim() == 3:
            # classification layout [1, H*W, C] -> segmentation layout [1, C, H, W]
            side = math.isqrt(value.shape[1])
            value = value.transpose(1, 2).reshape(1, value.shape[2], side, side)
        converted[prefix + name] = value
    return converted


def load_swin_state_dict(path: str, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """Read the state dict of a checkpoint (its ``model`` or ``state_dict`` entry, or a bare
    state dict of tensors). Raises ``ValueError`` naming ``path`` if there is none.

    Args:
        trusted: also unpickle arbitrary Python objects (only for files you trust: some
            official checkpoints store their training config next to the weights).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except OSError:
        raise
    except Exception as e:  # torch.load raises many exception types for files it cannot read
        if "Weights only load failed" in str(e):
            raise ValueError(
                f"{path}: holds pickled Python objects besides tensors; if you trust the file, "
                "load it with trusted=True (--trusted)."
            ) from e
        raise ValueError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(checkpoint, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    is_state_dict = isinstance(checkpoint, Mapping) and all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    )
    if not is_state_dict:
        raise ValueError(f"{path}: not a Swin Transformer checkpoint (no state dict of tensors)")
    return dict(checkpoint)


def convert_swin_checkpoint(
    input_path: str,
    output_path: str,
    window_size: Optional[int] = None,
    prefix: str = "backbone.",
    trusted: bool = False,
) -> Dict[str, torch.Tensor]:
    """Convert an official Swin checkpoint file to a Detectron2 checkpoint
    ``{"model": {prefix + name: tensor}, "__author__": ...}``, written atomically (temporary file
    in the output directory, then renamed). Returns the converted weights."""
    try:
        state_dict = load_swin_state_dict(input_path, trusted)
        weights = convert_swin_state_dict(state_dict, window_size, prefix)
    except ValueError as e:
        message = str(e)
        if not message.startswith(input_path):
            message = f"{input_path}: {message}"
        raise ValueError(message) from e
    with atomic_write(output_path, "wb") as f:
        torch.save({"model": weights, "__author__": "mask2former.convert_swin_to_d2"}, f)
    return weights
