"""Post-processing of predicted probabilities and label maps: soft voting (:mod:`.vote`),
argmax labels (:mod:`.labels`), model agreement (:mod:`.agreement`), 3x3 mode filter
(:mod:`.mode_filter`) and DenseCRF (:mod:`.crf`, imported on its own: it needs pydensecrf)."""

from .agreement import agreement_map, agreement_overwrite, check_min_agree
from .labels import argmax_labels, label_dtype
from .mode_filter import mode_filter
from .vote import normalize_weights, soft_vote

__all__ = [
    "agreement_map",
    "agreement_overwrite",
    "argmax_labels",
    "check_min_agree",
    "label_dtype",
    "mode_filter",
    "normalize_weights",
    "soft_vote",
]
