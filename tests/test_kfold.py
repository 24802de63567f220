"""Multi-label stratified k-fold: balance vs random splits, determinism, written jsons."""

import json

import numpy as np
import pytest

from mask2former.data.offline.kfold import (
    image_labels,
    iterative_stratification,
    write_kfold_splits,
)


def skewed_multilabel(n=400, n_classes=10, seed=0):
    """Images with 0-4 classes; class frequencies from very common to rare."""
    rng = np.random.default_rng(seed)
    freq = np.geomspace(0.6, 0.02, n_classes)
    return [set(np.flatnonzero(rng.random(n_classes) < freq).tolist()) for _ in range(n)]


def class_imbalance(labels, folds, k):
    """Mean over classes of the mean |images with the class in a fold - expected|."""
    devs = []
    for c in sorted({c for labs in labels for c in labs}):
        has = np.array([c in labs for labs in labels])
        per_fold = np.array([has[folds == f].sum() for f in range(k)])
        devs.append(np.abs(per_fold - has.sum() / k).mean())
    return float(np.mean(devs))


def test_balanced_better_than_random():
    labels = skewed_multilabel()
    k = 5
    folds = iterative_stratification(labels, k, seed=0)
    assert folds.shape == (len(labels),) and set(folds.tolist()) == set(range(k))
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 0.1 * len(labels) / k
    rng = np.random.default_rng(1)
    random_imbalance = np.mean(
        [class_imbalance(labels, rng.permutation(np.arange(len(labels)) % k), k) for _ in range(20)]
    )
    assert class_imbalance(labels, folds, k) < 0.5 * random_imbalance
    # Every class with at least k images is in every fold.
    for c in range(10):
        has = np.array([c in labs for labs in labels])
        if has.sum() >= k:
            assert all(has[folds == f].any() for f in range(k))


def test_deterministic_and_edge_cases():
    labels = skewed_multilabel(n=60)
    np.testing.assert_array_equal(
        iterative_stratification(labels, 3, 7), iterative_stratification(labels, 3, 7)
    )
    assert not np.array_equal(
        iterative_stratification(labels, 3, 7), iterative_stratification(labels, 3, 8)
    )
    unlabeled = iterative_stratification([set()] * 9, 3)
    assert np.bincount(unlabeled).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="n_folds"):
        iterative_stratification(labels, 1)
    with pytest.raises(ValueError, match="cannot split"):
        iterative_stratification([{1}, {2}], 3)


def test_write_kfold_splits(tmp_path):
    labels = skewed_multilabel(n=30, n_classes=4, seed=2)
    coco = {
        "info": {"description": "t"},
        "categories": [{"id": c + 1, "name": str(c)} for c in range(4)],
        "images": [
            {"id": 100 + i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(30)
        ],
        "annotations": [],
    }
    for i, labs in enumerate(labels):
        for c in sorted(labs):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": 100 + i,
                    "category_id": c + 1,
                    "segmentation": [[0, 0, 4, 0, 4, 4]],
                }
            )
    src = tmp_path / "train_all.json"
    src.write_text(json.dumps(coco))
    folds = write_kfold_splits(str(src), str(tmp_path / "folds"), n_folds=3, seed=0)
    assert image_labels(coco)[1] == [{c + 1 for c in labs} for labs in labels]
    seen_val = []
    for k in range(3):
        train = json.loads((tmp_path / "folds" / f"train_fold{k}.json").read_text())
        val = json.loads((tmp_path / "folds" / f"val_fold{k}.json").read_text())
        train_ids, val_ids = {i["id"] for i in train["images"]}, {i["id"] for i in val["images"]}
        assert train_ids | val_ids == {100 + i for i in range(30)} and not train_ids & val_ids
        assert val_ids == {100 + i for i in np.flatnonzero(folds == k)}
        assert {a["image_id"] for a in val["annotations"]} <= val_ids
        assert len(train["annotations"]) + len(val["annotations"]) == len(coco["annotations"])
        assert val["categories"] == coco["categories"] and val["info"] == coco["info"]
        seen_val += sorted(val_ids)
    assert sorted(seen_val) == [100 + i for i in range(30)]
