"""Weighted soft voting of per-model class probabilities."""

from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["normalize_weights", "soft_vote"]


def normalize_weights(weights: Optional[Sequence[float]], num_models: int) -> np.ndarray:
    """Per-model weights divided by their sum (float64); ``None`` means equal weights.

    Raises:
        ValueError: wrong count, or a weight that is not a positive finite number.
    """
    if num_models < 1:
        raise ValueError("an ensemble needs at least one model")
    if weights is None:
        return np.full(num_models, 1.0 / num_models)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_models,):
        raise ValueError(f"{num_models} models but {weights.size} weights {weights.tolist()}")
    if not (np.isfinite(weights) & (weights > 0)).all():
        raise ValueError(f"weights must be positive finite numbers, got {weights.tolist()}")
    return weights / weights.sum()


def soft_vote(prob_maps: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_m weights[m] * prob_maps[m]`` in float32, consuming ``prob_maps`` one at a time.

    ``weights`` are used as given (see :func:`normalize_weights`); there must be one per map.
    """
    weights = list(weights)
    total = None
    count = 0
    for probs, weight in zip(prob_maps, weights):
        weight = np.float32(weight)
        if total is None:
            total = np.multiply(probs, weight, dtype=np.float32)
        else:
            if probs.shape != total.shape:
                raise ValueError(f"probability maps of shapes {total.shape} and {probs.shape}")
            # float32 scalar * float16 / float32 map -> float32, added in place.
            total += np.multiply(probs, weight, dtype=np.float32)
        count += 1
    if count != len(weights):
        raise ValueError(f"{len(weights)} weights but {count} probability maps")
    return total
