"""Deployable exports of trained semantic models."""

from .onnx import (
    EXPORT_FORWARD,
    EXPORTABLE_IMPLS,
    ProbabilityModel,
    compare_onnx,
    export_config,
    export_onnx,
)

__all__ = [
    "EXPORTABLE_IMPLS",
    "EXPORT_FORWARD",
    "ProbabilityModel",
    "compare_onnx",
    "export_config",
    "export_onnx",
]
