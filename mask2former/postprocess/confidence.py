"""Pseudo-label maps from class probabilities: the argmax where the model is confident, the
ignore label elsewhere (optionally without small components and mode-filtered), with pixel
statistics over many images."""

from typing import Mapping, Optional, Sequence

import cv2
import numpy as np

from .mode_filter import mode_filter

__all__ = ["PseudoLabelStats", "pseudo_label_map", "threshold_per_class"]


class PseudoLabelStats:
    """Pixel counts of the pseudo-labels of many images (updated by :func:`pseudo_label_map`).

    ``predicted_pixels[c]``: pixels whose argmax is class ``c``; ``pseudo_pixels[c]``: pixels
    labelled ``c`` in the final label maps; the rest of the pixels are ignored.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images = 0
        self.total_pixels = 0
        self.predicted_pixels = np.zeros(num_classes, dtype=np.int64)
        self.pseudo_pixels = np.zeros(num_classes, dtype=np.int64)
        self.removed_components = 0
        self.removed_pixels = 0

    @property
    def ignored_pixels(self) -> int:
        return int(self.total_pixels - self.pseudo_pixels.sum())

    def confident_fraction(self) -> float:
        """Fraction of all pixels that got a label."""
        return (
            float(self.pseudo_pixels.sum() / self.total_pixels)
            if self.total_pixels
            else float("nan")
        )

    def class_fractions(self) -> np.ndarray:
        """Per class: pseudo-labelled pixels / argmax pixels (NaN for a class never predicted)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(
                self.predicted_pixels > 0, self.pseudo_pixels / self.predicted_pixels, np.nan
            )

    def as_dict(self, class_names: Sequence[str]) -> dict:
        fractions = self.class_fractions()
        return {
            "images": self.images,
            "total_pixels": int(self.total_pixels),
            "ignored_pixels": self.ignored_pixels,
            "confident_fraction": self.confident_fraction(),
            "removed_small_components": self.removed_components,
            "removed_small_component_pixels": self.removed_pixels,
            "per_class": [
                {
                    "label": label,
                    "name": name,
                    "predicted_pixels": int(self.predicted_pixels[label]),
                    "pseudo_pixels": int(self.pseudo_pixels[label]),
                    "confident_fraction": None
                    if np.isnan(fractions[label])
                    else float(fractions[label]),
                }
                for label, name in enumerate(class_names)
            ],
        }


def threshold_per_class(
    num_classes: int, threshold: float, class_thresholds: Optional[Mapping[int, float]]
):
    """[K] array of thresholds: ``threshold`` overridden by ``class_thresholds`` (label ->
    value)."""
    values = np.full(num_classes, float(threshold))
    for label, value in (class_thresholds or {}).items():
        if not 0 <= int(label) < num_classes:
            raise ValueError(f"class threshold for label {label}: labels are 0..{num_classes - 1}")
        values[int(label)] = float(value)
    if not ((values >= 0) & (values <= 1)).all():
        raise ValueError(
            f"thresholds must lie in [0, 1], got {threshold} and {dict(class_thresholds or {})}"
        )
    return values


def _remove_small_components(label: np.ndarray, min_component: int, ignore_label: int):
    """Set 8-connected components (of every label but ``ignore_label``) with fewer than
    ``min_component`` pixels to ``ignore_label`` in place. Returns (components, pixels) removed."""
    removed_components = removed_pixels = 0
    for value in np.unique(label):
        if value == ignore_label:
            continue
        _, components, boxes, _ = cv2.connectedComponentsWithStats(
            (label == value).astype(np.uint8), connectivity=8
        )
        small = boxes[:, cv2.CC_STAT_AREA] < min_component
        small[0] = False  # component 0 is everything else
        if small.any():
            label[small[components]] = ignore_label
            removed_components += int(small.sum())
            removed_pixels += int(boxes[small, cv2.CC_STAT_AREA].sum())
    return removed_components, removed_pixels


def pseudo_label_map(
    probs,
    threshold: float,
    ignore_label: int = 255,
    min_component: int = 0,
    class_thresholds: Optional[Mapping[int, float]] = None,
    apply_mode_filter: bool = False,
    stats: Optional[PseudoLabelStats] = None,
) -> np.ndarray:
    """Pseudo-label map of one image.

    Steps: ``c = argmax_k probs[k]`` (ties: the lowest label); the pixel keeps ``c`` if
    ``probs[c] >= threshold`` (or ``>= class_thresholds[c]`` when given for ``c``), else it gets
    ``ignore_label``; optionally a 3x3 mode filter in which ignored pixels neither vote nor change
    (:func:`~mask2former.postprocess.mode_filter`); finally the 8-connected components of
    every label (background included) with fewer than ``min_component`` pixels become ignored.

    Args:
        probs (np.ndarray or CPU tensor): [K, H, W] class probabilities (K <= 255).
        threshold (float): in [0, 1].
        ignore_label (int): label of unconfident pixels, in [K, 255].
        min_component (int): smallest confident component kept (0 or 1: all kept).
        class_thresholds (dict[int, float] or None): label -> threshold overriding ``threshold``.
        apply_mode_filter (bool): smooth the confident labels with a 3x3 mode filter.
        stats (PseudoLabelStats or None): updated in place.

    Returns:
        np.ndarray: [H, W] uint8 label map.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must be [K, H, W], got shape {probs.shape}")
    num_classes = probs.shape[0]
    if not num_classes <= ignore_label <= 255:
        raise ValueError(
            f"ignore_label must lie in [{num_classes}, 255] for {num_classes} classes in a uint8 "
            f"label map, got {ignore_label}"
        )
    thresholds = threshold_per_class(num_classes, threshold, class_thresholds)
    prediction = probs.argmax(0)
    confidence = probs.max(0)
    if not np.isfinite(confidence).all():
        raise ValueError("probabilities contain NaN or infinite values")
    label = np.where(confidence >= thresholds[prediction], prediction, ignore_label).astype(
        np.uint8
    )
    if apply_mode_filter:
        label = mode_filter(label, ignore_label=ignore_label)
    removed = (0, 0)
    if min_component > 1:
        removed = _remove_small_components(label, min_component, ignore_label)
    if stats is not None:
        if stats.num_classes != num_classes:
            raise ValueError(
                f"stats count {stats.num_classes} classes, probabilities have {num_classes}"
            )
        stats.images += 1
        stats.total_pixels += label.size
        stats.predicted_pixels += np.bincount(prediction.ravel(), minlength=num_classes)
        stats.pseudo_pixels += np.bincount(label.ravel(), minlength=256)[:num_classes]
        stats.removed_components += removed[0]
        stats.removed_pixels += removed[1]
    return label
