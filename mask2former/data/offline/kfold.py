"""Multi-label stratified k-fold split over images.

The labels of an image are the classes present in it. :func:`iterative_stratification` is the
iterative stratification of Sechidis, Tsoumakas and Vlahavas (ECML 2011): labels are handled
rarest first; each image carrying the current label goes to the fold that still wants that label
the most (ties: the fold that wants the most images, then the lowest random rank). Images without
labels fill the folds that want the most images.

:func:`write_kfold_splits` writes ``train_fold{k}.json`` / ``val_fold{k}.json`` from a COCO json.
"""

import os

import numpy as np

from ...utils.io import write_json
from ..coco.json_file import read_coco_json

__all__ = ["image_labels", "iterative_stratification", "write_kfold_splits"]


def iterative_stratification(labels, n_folds, seed=0):
    """Assign every sample to a fold.

    Args:
        labels (list[set[int]]): the labels of each sample.
        n_folds (int): number of folds (>= 2).
        seed (int): tie-breaking seed.

    Returns:
        np.ndarray: fold index (0..n_folds-1) per sample.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n = len(labels)
    if n < n_folds:
        raise ValueError(f"cannot split {n} samples into {n_folds} folds")
    rng = np.random.default_rng(seed)
    fold_rank = rng.permutation(n_folds)  # deterministic random tie-break between folds
    all_labels = sorted({lab for labs in labels for lab in labs})
    label_index = {lab: i for i, lab in enumerate(all_labels)}
    # Desired number of samples (per fold) and of samples per label (per fold).
    want_total = np.full(n_folds, n / n_folds)
    counts = np.zeros(len(all_labels))
    for labs in labels:
        for lab in labs:
            counts[label_index[lab]] += 1
    want = np.tile(counts / n_folds, (n_folds, 1))
    remaining = counts.copy()
    folds = np.full(n, -1, dtype=np.int64)
    by_label = [[] for _ in all_labels]
    for i, labs in enumerate(labels):
        for lab in labs:
            by_label[label_index[lab]].append(i)
    order = rng.permutation(n)  # random processing order of samples within a label

    def assign(i, candidates):
        best = max(candidates, key=lambda f: (want_total[f], -fold_rank[f]))
        folds[i] = best
        want_total[best] -= 1
        for lab in labels[i]:
            li = label_index[lab]
            want[best, li] -= 1
            remaining[li] -= 1

    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    while np.any(remaining > 0):
        active = np.flatnonzero(remaining > 0)
        li = active[np.argmin(remaining[active])]
        for i in sorted(by_label[li], key=lambda s: position[s]):
            if folds[i] != -1:
                continue
            top = want[:, li].max()
            assign(i, [f for f in range(n_folds) if want[f, li] == top])
    for i in order:
        if folds[i] == -1:
            assign(i, range(n_folds))
    return folds


def image_labels(coco):
    """Image ids (json order) and the set of category ids present in each image."""
    present = {img["id"]: set() for img in coco["images"]}
    for ann in coco.get("annotations", []):
        if ann["image_id"] in present:
            present[ann["image_id"]].add(ann["category_id"])
    ids = [img["id"] for img in coco["images"]]
    return ids, [present[i] for i in ids]


def _subset(coco, image_ids):
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [img for img in coco["images"] if img["id"] in keep]
    out["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in keep]
    return out


def write_kfold_splits(json_file, output_dir, n_folds=5, seed=0):
    """Write ``train_fold{k}.json`` and ``val_fold{k}.json`` (k = 0..n_folds-1) for a COCO json.

    Image and annotation entries are copied unchanged (ids kept); fold k's images are the
    validation set of split k and the training set of every other split.

    Returns:
        np.ndarray: fold index per image (json order).
    """
    coco = read_coco_json(json_file)
    ids, labels = image_labels(coco)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{json_file}: duplicate image ids; validate the json first")
    folds = iterative_stratification(labels, n_folds, seed)
    os.makedirs(output_dir, exist_ok=True)
    for k in range(n_folds):
        val_ids = [i for i, f in zip(ids, folds) if f == k]
        train_ids = [i for i, f in zip(ids, folds) if f != k]
        write_json(os.path.join(output_dir, f"train_fold{k}.json"), _subset(coco, train_ids))
        write_json(os.path.join(output_dir, f"val_fold{k}.json"), _subset(coco, val_ids))
    return folds
