"""Offline data tools (run by the scripts in ``datasets/``, never during training): k-fold
splits, label-map folders -> COCO json, and the synthetic demo dataset.

Nothing is imported here: ``import mask2former.data`` does not load these modules."""
