"""Label maps from class probabilities: the smallest label dtype and the argmax."""

import numpy as np

__all__ = ["argmax_labels", "label_dtype"]


def label_dtype(num_classes: int):
    """Smallest unsigned dtype holding labels 0..num_classes-1 (uint8 up to 256 classes)."""
    if num_classes <= 256:
        return np.uint8
    if num_classes <= 65536:
        return np.uint16
    raise ValueError(f"{num_classes} classes do not fit a uint16 label map")


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    """Argmax over the class axis of [K, H, W] (first class on ties), as uint8 (uint16 beyond
    256 classes)."""
    return probs.argmax(axis=0).astype(label_dtype(probs.shape[0]))
