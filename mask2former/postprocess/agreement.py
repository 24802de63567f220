"""Where several models agree on a pixel's label, and putting the agreed labels back after a
post-processing step (DenseCRF) that erased them."""

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["agreement_map", "agreement_overwrite", "check_min_agree"]


def check_min_agree(min_agree: Optional[int], num_models: int) -> int:
    """``min_agree`` validated against ``num_models`` (None means all models)."""
    if min_agree is None:
        return num_models
    is_int = isinstance(min_agree, (int, np.integer)) and not isinstance(min_agree, bool)
    if not is_int or not 1 <= min_agree <= num_models:
        raise ValueError(f"min_agree must be an integer in [1, {num_models}], got {min_agree!r}")
    return int(min_agree)


def agreement_map(
    label_maps: Sequence[np.ndarray], min_agree: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Where the models agree.

    A pixel agrees when its most frequent label among the M models' labels is unique and given
    by at least ``min_agree`` models (default M: all of them).

    Args:
        label_maps: M label maps H x W (each model's argmax).
        min_agree: 1..M.

    Returns:
        (labels, mask): H x W most frequent label (meaningful where ``mask``; the maps' common
        dtype) and H x W bool agreement mask.
    """
    if len(label_maps) == 0:
        raise ValueError("agreement_map needs at least one label map")
    labels = np.stack([np.asarray(m) for m in label_maps])
    if labels.ndim != 3:
        raise ValueError(f"label maps must be H x W, got shape {labels.shape[1:]}")
    num_models = labels.shape[0]
    min_agree = check_min_agree(min_agree, num_models)
    # votes[m] = number of models whose label equals model m's label (itself included).
    votes = np.zeros(labels.shape, dtype=np.uint16)
    for other in labels:
        votes += labels == other
    top = votes.max(axis=0)
    best = votes.argmax(axis=0)
    agreed = np.take_along_axis(labels, best[None], axis=0)[0]
    # Another label with as many votes: no unique winner.
    rival = ((votes == top) & (labels != agreed)).any(axis=0)
    return agreed, (top >= min_agree) & ~rival


def agreement_overwrite(crf_labels, agreement_labels, agreement_mask) -> np.ndarray:
    """The first-place team's fix for DenseCRF erasing small objects: pixels where the individual
    models agree (``agreement_mask``) take the agreed label, the others keep the CRF label.

    Args:
        crf_labels: H x W integer labels after CRF.
        agreement_labels: H x W integer labels the models agree on (read where the mask is set).
        agreement_mask: H x W bool, True where the models agree.

    Returns:
        H x W labels, dtype of ``crf_labels`` (a new array).
    """
    crf_labels = np.asarray(crf_labels)
    agreement_labels = np.asarray(agreement_labels)
    agreement_mask = np.asarray(agreement_mask)
    if crf_labels.ndim != 2:
        raise ValueError(f"CRF labels must be H x W, got shape {crf_labels.shape}")
    for name, array in (("agreement labels", agreement_labels), ("agreement mask", agreement_mask)):
        if array.shape != crf_labels.shape:
            raise ValueError(f"{name} have shape {array.shape}, CRF labels {crf_labels.shape}")
    if agreement_mask.dtype != np.bool_:
        raise ValueError(f"agreement mask must be bool, got dtype {agreement_mask.dtype}")
    for name, array in (("CRF labels", crf_labels), ("agreement labels", agreement_labels)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    out = crf_labels.copy()
    if agreement_mask.any():
        agreed = agreement_labels[agreement_mask]
        info = np.iinfo(out.dtype)
        if agreed.min() < info.min or agreed.max() > info.max:
            raise ValueError(f"agreement labels do not fit the CRF labels' dtype {out.dtype}")
        out[agreement_mask] = agreed
    return out
