"""ONNX export of a semantic model at a fixed input size.

The exported graph has one input ``image`` (float32 [1, 3, H, W], the model's channel order
``INPUT.FORMAT``, values 0..255; the pixel mean/std normalisation is inside the graph) and one
output ``probs`` (float32 [1, K, H, W]): the calibrated per-pixel class probabilities that
:class:`~mask2former.inference.predictor.SemSegPredictor` computes without test-time augmentation
for an H x W image whose short edge is the test size.

The graph is made by ``torch.onnx.export(..., dynamo=True)``: ``torch.export`` runs the model at
the fixed size, so every piece of Python-side shape logic (paddings, window partitions, resize
matrices, the band loop of the semantic inference) becomes constants of that size. The
TorchScript tracer instead records such shape arithmetic as graph ops, and ONNX Runtime rejects
the result (Swin's shifted-window mask: a Reshape to an invalid shape).
"""

import logging
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

from mask2former.inference.predictor import calibrate
from mask2former.utils.io import atomic_write

__all__ = [
    "EXPORTABLE_IMPLS",
    "EXPORT_FORWARD",
    "ProbabilityModel",
    "compare_onnx",
    "export_config",
    "export_onnx",
]

logger = logging.getLogger(__name__)

# Implementation switches whose default ("auto") may pick a path that cannot be exported, and
# the tested-equal implementation the export uses instead: the fast deformable attention is a
# custom autograd function; DiNAT's tiled path builds its tiling from tensor values
# (``torch.unique``), flex attention and NATTEN are kernels, as is Swin's CPU window attention.
# DiNAT's reference path gathers explicit neighbour indices (memory H * W * kernel_size**2 *
# channels).
EXPORTABLE_IMPLS: Tuple[Tuple[str, str], ...] = (
    ("MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL", "pytorch"),
    ("MODEL.DINAT.ATTENTION_IMPL", "reference"),
    ("MODEL.SWIN.ATTENTION_IMPL", "partition"),
)

# The forward the graph records: fp32 and eager. A reduced ``MODEL.PRECISION`` would bake
# autocast casts into the graph (ONNX Runtime chooses its own precision), and ``MODEL.COMPILE``
# wraps modules that ``torch.export`` must trace itself.
EXPORT_FORWARD: Tuple[Tuple[str, object], ...] = (
    ("MODEL.PRECISION", "fp32"),
    ("MODEL.COMPILE", False),
)


def export_config(cfg):
    """A copy of ``cfg`` with the implementations of :data:`EXPORTABLE_IMPLS` (each gives the
    same numbers as the others; see their config comments) and the fp32 eager forward of
    :data:`EXPORT_FORWARD`; each change is logged."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in EXPORTABLE_IMPLS + EXPORT_FORWARD:
        node, *path, leaf = key.split(".")
        parent = cfg
        for name in [node, *path]:
            parent = parent.get(name) if parent is not None else None
        if parent is None or leaf not in parent:
            continue  # a family without this switch
        if parent[leaf] != value:
            logger.info("export: %s %s (was %s)", key, value, parent[leaf])
            parent[leaf] = value
    cfg.freeze()
    return cfg


class ProbabilityModel(nn.Module):
    """``image`` [1, 3, H, W] (float, 0..255, model channel order) -> ``probs`` [1, K, H, W]:
    the model's semantic scores at the input size, calibrated (divided by their per-pixel sum)."""

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        if height <= 0 or width <= 0:
            raise ValueError(f"export size must be positive, got {height} x {width}")
        self.model = model.eval()
        self.height = int(height)
        self.width = int(width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        expected = (1, 3, self.height, self.width)
        if tuple(image.shape) != expected:
            raise ValueError(f"expected image of shape {expected}, got {tuple(image.shape)}")
        inputs = [{"image": image[0], "height": self.height, "width": self.width}]
        return calibrate(self.model(inputs)[0]["sem_seg"])[None]


def export_onnx(
    model: nn.Module, path: str, height: int, width: int, opset_version: int = 18
) -> ProbabilityModel:
    """Export ``model`` (a built semantic model with its weights, on CPU) at ``height`` x
    ``width`` to ``path`` (written atomically); returns the exported :class:`ProbabilityModel`."""
    wrapper = ProbabilityModel(model, height, width).eval()
    example = (torch.zeros(1, 3, height, width),)
    with torch.no_grad():
        # One eager forward at the export size first: the constants the model caches per size
        # and device (resize matrices and their row bands, window layouts, level tables) are
        # then real tensors and Python ints, which the traced graph embeds; built first while
        # tracing, they would be placeholders (and the row bands data-dependent sizes).
        wrapper(*example)
        program = torch.onnx.export(
            wrapper,
            example,
            input_names=["image"],
            output_names=["probs"],
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
        )
    with atomic_write(path) as f:
        f.write(program.model_proto.SerializeToString())
    return wrapper


def compare_onnx(path: str, wrapper: ProbabilityModel, seed: int = 0) -> Dict[str, float]:
    """Check the ONNX file (``onnx.checker``) and compare ONNX Runtime (CPU) with PyTorch on a
    random 0..255 image: max absolute probability difference and the fraction of pixels with
    the same argmax."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"{path}: not a valid ONNX model: {e}") from e
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(1, 3, wrapper.height, wrapper.width)).astype(np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probs"], {"image": image})[0]
    with torch.no_grad():
        torch_probs = wrapper(torch.from_numpy(image)).numpy()
    if onnx_probs.shape != torch_probs.shape:
        raise RuntimeError(
            f"{path}: ONNX output shape {onnx_probs.shape}, PyTorch {torch_probs.shape}"
        )
    return {
        "max_abs_diff": float(np.abs(onnx_probs - torch_probs).max()),
        "argmax_agreement": float((onnx_probs.argmax(1) == torch_probs.argmax(1)).mean()),
    }
