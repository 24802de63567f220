"""Copy-paste bank: pasting, class weighting, atomic versions, the sampler and the hook."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from mask2former.data import register_trash_dataset
from mask2former.data.augmentation import copy_paste as cp
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine.hooks import CopyPasteBankHook, iou_by_label


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_trash(
        str(root / "data"), num_train=12, num_val=2, num_test=1, image_size=64, seed=3
    )
    register_trash_dataset(str(root / "data"), prefix="cp_test")
    records = DatasetCatalog.get("cp_test_train")
    yield records
    for split in ("train_all", "train", "val", "test"):
        DatasetCatalog.remove(f"cp_test_{split}")


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_class_weights_from_iou():
    w = cp.class_weights_from_iou([1, 2, 3, 4], {1: 0.9, 2: 0.5, 3: 1.0, 4: float("nan")})
    raw = np.array([0.1, 0.5, 0.05, np.mean([0.1, 0.5, 0.0])])  # floor 0.05; NaN -> mean of scored
    np.testing.assert_allclose(w, raw / raw.sum())
    np.testing.assert_allclose(cp.class_weights_from_iou([1, 2], None), [0.5, 0.5])
    with pytest.raises(ValueError, match="no pastable objects"):
        cp.class_weights_from_iou([], None)


def test_paste_hard_and_blended_edges():
    image = np.zeros((20, 20, 3), np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    patch = np.full((6, 6, 3), 200, np.uint8)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    rng = np.random.default_rng(0)
    assert cp.paste(image, labels, patch, mask, 7, rng, (1.0, 1.0), blend_sigma=0.0)
    assert (labels == 7).sum() == 16
    assert (image[labels == 7] == 200).all() and (image[labels != 7] == 0).all()

    image2 = np.zeros((20, 20, 3), np.uint8)
    labels2 = np.zeros((20, 20), np.uint8)
    assert cp.paste(
        image2, labels2, patch, mask, 7, np.random.default_rng(0), (1.0, 1.0), blend_sigma=1.0
    )
    np.testing.assert_array_equal(labels2, labels)  # labels stay hard
    inside = image2[labels2 == 7][:, 0]
    assert inside.max() <= 200 and inside.min() < 200  # soft edge pixels
    assert (image2[labels2 != 7] == 0).all()  # nothing outside the mask changes


def test_bank_versions_are_atomic_and_data_untouched(train_records, tmp_path):
    data_dir = os.path.dirname(os.path.dirname(train_records[0]["file_name"]))
    before = _tree_digest(data_dir)
    bank = tmp_path / "bank"
    first = cp.generate_bank(
        train_records, str(bank), 4, seed=0, class_names=[str(i) for i in range(11)]
    )
    assert (bank / "CURRENT").read_text().strip() == "v0000" and first.endswith("v0000")
    version, records = cp.read_current_bank(str(bank))
    assert version == "v0000" and len(records) == 4
    for r in records:
        lab = record_to_label_map(r)
        assert lab.shape == (r["height"], r["width"]) and lab.max() <= 10
    meta = json.loads((bank / "v0000" / "bank.json").read_text())
    assert meta["annotations"] and {c["id"] for c in meta["categories"]} == set(range(1, 11))
    assert {a["category_id"] for a in meta["annotations"]} <= set(range(1, 11))
    cp.generate_bank(train_records, str(bank), 2, seed=1)
    cp.generate_bank(train_records, str(bank), 2, seed=2)
    assert sorted(d for d in os.listdir(bank) if d.startswith("v")) == ["v0001", "v0002"]
    assert not [d for d in os.listdir(bank) if d.startswith(".building")]
    assert _tree_digest(data_dir) == before


def test_failed_generation_leaves_current_bank(train_records, tmp_path, monkeypatch):
    bank = tmp_path / "bank"
    cp.generate_bank(train_records, str(bank), 2, seed=0)
    calls = {"n": 0}
    real = cp.cv2.imwrite

    def failing_imwrite(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(cp.cv2, "imwrite", failing_imwrite)
    with pytest.raises(OSError, match="disk full"):
        cp.generate_bank(train_records, str(bank), 3, seed=1)
    assert (bank / "CURRENT").read_text().strip() == "v0000"
    assert sorted(os.listdir(bank)) == ["CURRENT", "v0000"]


def test_weak_classes_are_pasted_more(train_records, tmp_path):
    pool = cp.ObjectPool(train_records)
    weak = pool.labels[0]
    iou = {label: (0.0 if label == weak else 1.0) for label in pool.labels}
    folder = cp.generate_bank(train_records, str(tmp_path / "b"), 30, iou, seed=0, pool=pool)
    counts = json.loads(Path(folder, "bank.json").read_text())["pasted_per_class"]
    total = sum(counts.values())
    # weight of the weak class: 1 / (1 + 0.05 * (n - 1)) of the draws
    expected = 1.0 / (1.0 + 0.05 * (len(pool.labels) - 1))
    assert counts[str(weak)] / total > 0.5 and counts[str(weak)] / total <= 1.0
    assert abs(counts[str(weak)] / total - expected) < 0.25


def test_generation_is_deterministic(train_records, tmp_path):
    a = cp.generate_bank(train_records, str(tmp_path / "a"), 3, seed=5)
    b = cp.generate_bank(train_records, str(tmp_path / "b"), 3, seed=5)
    for name in ("images/000000.jpg", "labels/000002.png"):
        assert Path(a, name).read_bytes() == Path(b, name).read_bytes()


def test_sampler_probability_refresh_and_pickling(train_records, tmp_path):
    bank = tmp_path / "bank"
    original = train_records[0]
    rng = np.random.default_rng(0)
    never = cp.CopyPasteSampler(str(bank), 0.0)
    always = cp.CopyPasteSampler(str(bank), 1.0)
    assert always.maybe_sample(original, rng) is original  # no bank yet
    cp.generate_bank(train_records, str(bank), 2, seed=0)
    assert never.maybe_sample(original, rng) is original
    got = always.maybe_sample(original, rng)
    assert "/v0000/" in got["file_name"] and got["sem_seg_file_name"].endswith(".png")
    clone = pickle.loads(pickle.dumps(always))
    cp.generate_bank(train_records, str(bank), 2, seed=1)
    assert "/v0001/" in clone.maybe_sample(original, rng)["file_name"]
    half = cp.CopyPasteSampler(str(bank), 0.5)
    picks = [half.maybe_sample(original, rng) is original for _ in range(400)]
    assert 0.4 < np.mean(picks) < 0.6
    with pytest.raises(ValueError):
        cp.CopyPasteSampler(str(bank), 1.5)


class _Storage:
    def __init__(self, latest):
        self._latest = latest

    def latest(self):
        return {k: (v, 0) for k, v in self._latest.items()}


class _Trainer:
    def __init__(self, it, max_iter, latest):
        self.iter, self.max_iter, self.storage = it, max_iter, _Storage(latest)


def test_hook_regenerates_before_training_and_after_each_evaluation(train_records, tmp_path):
    names = [
        "Background",
        "General trash",
        "Paper",
        "Paper pack",
        "Metal",
        "Glass",
        "Plastic",
        "Styrofoam",
        "Plastic bag",
        "Battery",
        "Clothing",
    ]
    hook = CopyPasteBankHook(
        lambda: train_records, str(tmp_path / "bank"), names, eval_period=10, num_images=2, seed=0
    )
    latest = {f"sem_seg/IoU-{n}": 0.9 for n in names}
    latest["sem_seg/IoU-Glass"] = 0.1
    hook.trainer = _Trainer(0, 100, latest)
    hook.before_train()
    assert cp.read_current_bank(str(tmp_path / "bank"))[0] == "v0000"
    hook.trainer.iter = 4  # not an evaluation iteration
    hook.after_step()
    assert cp.read_current_bank(str(tmp_path / "bank"))[0] == "v0000"
    hook.trainer.iter = 9  # EvalHook evaluates after iteration 9 (next_iter 10)
    hook.after_step()
    folder = tmp_path / "bank" / "v0001"
    probs = json.loads((folder / "bank.json").read_text())["class_probs"]
    assert max(probs, key=probs.get) == "5"  # Glass, the weakest class
    assert iou_by_label(latest, names)[5] == pytest.approx(0.1)


def test_ignored_pixels_of_targets_stay_ignored(train_records, tmp_path):
    from PIL import Image

    src = train_records[0]
    label = record_to_label_map(src).copy()
    label[:, : label.shape[1] // 2] = 255  # e.g. unconfident pseudo-label pixels
    png = tmp_path / "ignore.png"
    Image.fromarray(label).save(png)
    ignore_record = {k: src[k] for k in ("file_name", "height", "width")}
    ignore_record.update(image_id="with_ignore", sem_seg_file_name=str(png))
    folder = cp.generate_bank(
        train_records + [ignore_record] * 30, str(tmp_path / "bank"), 4, seed=0, ignore_label=255
    )
    bank = json.loads(Path(folder, "bank.json").read_text())
    assert {a["category_id"] for a in bank["annotations"]} <= set(range(1, 11))
    labels = [record_to_label_map(r) for r in cp.read_current_bank(str(tmp_path / "bank"))[1]]
    assert any((lab == 255).any() for lab in labels)
