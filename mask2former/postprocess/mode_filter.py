"""3x3 mode filter of a label map ("mode resampling" of predicted masks).

Every pixel takes the label that occurs most often in its 3x3 neighbourhood (itself included;
neighbours outside the image do not vote). When the most frequent label is not unique, the pixel
keeps its own label. With ``ignore_label``, ignored pixels neither vote nor change.
"""

import numpy as np

__all__ = ["mode_filter"]


def _box3x3(mask):
    """Number of True pixels in each 3x3 neighbourhood (zero padding), as uint8."""
    padded = np.pad(mask.astype(np.uint8), 1)
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]


def mode_filter(label, ignore_label=None):
    """Apply a 3x3 mode filter.

    Args:
        label (np.ndarray): H x W integer label map.
        ignore_label (int or None): label that does not vote and is kept as is.

    Returns:
        np.ndarray: filtered label map (same shape and dtype).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"mode_filter expects an H x W label map, got shape {label.shape}")
    best_count = np.zeros(label.shape, dtype=np.uint8)
    best_label = label.copy()
    tie = np.zeros(label.shape, dtype=bool)
    for value in np.unique(label):
        if ignore_label is not None and value == ignore_label:
            continue
        count = _box3x3(label == value)
        greater = count > best_count
        tie = np.where(greater, False, tie | ((count == best_count) & (count > 0)))
        best_label[greater] = value
        np.maximum(best_count, count, out=best_count)
    keep = tie | (best_count == 0)
    if ignore_label is not None:
        keep |= label == ignore_label
    return np.where(keep, label, best_label)
