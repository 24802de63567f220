"""Pseudo-labels: thresholding, the streaming writer (PNGs, COCO json, report, atomic output),
registration + the train mapper, and tools/pseudo_label.py end to end."""

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from mask2former.data.catalog import TRASH_CLASSES, TRASH_COLORS
from mask2former.data.catalog.pseudo import (
    register_pseudo_label_dataset,
    register_pseudo_labels_from_cfg,
)
from mask2former.data.masks.rasterize import record_to_label_map
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import get_project_cfg
from mask2former.inference.prob_dump import ProbDumpWriter
from mask2former.inference.pseudo_label_writer import PseudoLabelWriter
from mask2former.postprocess.confidence import PseudoLabelStats, pseudo_label_map
from mask2former.postprocess.mode_filter import mode_filter

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


def probs_from(label, confidence, num_classes):
    """[K, H, W] probabilities: ``confidence`` on ``label``, the rest spread evenly."""
    label, confidence = (
        np.asarray(label),
        np.broadcast_to(np.asarray(confidence, dtype=np.float64), np.shape(label)),
    )
    probs = np.repeat(((1 - confidence) / (num_classes - 1))[None], num_classes, axis=0)
    np.put_along_axis(probs, label[None], confidence[None], axis=0)
    return probs


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def unregister():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------ label maps

HAND_PROBS = np.array(
    [
        [[0.95, 0.10, 0.05], [0.4, 0.0, 0.5]],
        [[0.03, 0.85, 0.05], [0.3, 0.0, 0.5]],
        [[0.02, 0.05, 0.90], [0.3, 1.0, 0.0]],
    ]
)


def test_threshold_hand_case():
    # argmax [[0,1,2],[0,2,0 (tie 0/1 -> lowest)]], max [[.95,.85,.90],[.4,1,.5]]
    assert pseudo_label_map(HAND_PROBS, 0.9).tolist() == [[0, IGNORE, 2], [IGNORE, 2, IGNORE]]
    assert pseudo_label_map(HAND_PROBS, 0.5).tolist() == [[0, 1, 2], [IGNORE, 2, 0]]
    assert pseudo_label_map(HAND_PROBS, 0.0).tolist() == [[0, 1, 2], [0, 2, 0]]
    assert pseudo_label_map(HAND_PROBS, 0.9, ignore_label=3).tolist() == [[0, 3, 2], [3, 2, 3]]
    out = pseudo_label_map(torch.as_tensor(HAND_PROBS, dtype=torch.float16), 0.8)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1, 2], [IGNORE, 2, IGNORE]]


def test_class_thresholds_override_the_global_one():
    # class 1 needs only 0.8 (its 0.85 pixel is kept), class 2 needs 0.95 (its 0.90 pixel is not)
    out = pseudo_label_map(HAND_PROBS, 0.9, class_thresholds={1: 0.8, 2: 0.95})
    assert out.tolist() == [[0, 1, IGNORE], [IGNORE, 2, IGNORE]]
    # a threshold for class 0 applies to pixels predicted 0 only
    out = pseudo_label_map(HAND_PROBS, 0.9, class_thresholds={0: 0.4})
    assert out.tolist() == [[0, IGNORE, 2], [0, 2, 0]]


def test_statistics_count_argmax_and_pseudo_pixels():
    stats = PseudoLabelStats(3)
    pseudo_label_map(HAND_PROBS, 0.9, stats=stats)
    pseudo_label_map(HAND_PROBS, 0.5, stats=stats)
    assert stats.images == 2 and stats.total_pixels == 12
    assert stats.predicted_pixels.tolist() == [6, 2, 4]
    assert stats.pseudo_pixels.tolist() == [1 + 2, 0 + 1, 2 + 2]
    assert stats.ignored_pixels == 12 - 8 and stats.confident_fraction() == pytest.approx(8 / 12)
    np.testing.assert_allclose(stats.class_fractions(), [3 / 6, 1 / 2, 4 / 4])
    report = stats.as_dict(["a", "b", "c"])
    assert [c["confident_fraction"] for c in report["per_class"]] == pytest.approx([0.5, 0.5, 1.0])


def test_small_components_become_ignored_8_connected():
    label = np.array(
        [
            [0, 0, 0, 0, 0, 0, 2],
            [0, 1, 1, 1, 0, 0, 0],
            [0, 1, 0, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 3, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 4, 0, 0, 0, 0, 0],
            [0, 0, 4, 0, 0, 0, 0],
        ]
    )
    probs = probs_from(label, 0.99, 5)
    stats = PseudoLabelStats(5)
    out = pseudo_label_map(probs, 0.9, min_component=2, stats=stats)
    expected = label.copy()
    # single pixels of class 2 and 3, and the enclosed background pixel; the diagonal pair of
    # class 4 is one 8-connected component of 2 pixels and stays
    expected[0, 6] = expected[3, 5] = expected[2, 2] = IGNORE
    assert out.tolist() == expected.tolist()
    assert (stats.removed_components, stats.removed_pixels) == (3, 3)
    assert stats.pseudo_pixels.tolist() == [np.sum(expected == c) for c in range(5)]
    out = pseudo_label_map(probs, 0.9, min_component=3)
    assert (out == 4).sum() == 0 and (out == 1).sum() == 8
    assert pseudo_label_map(probs, 0.9, min_component=1).tolist() == label.tolist()
    # a class covering nearly everything: the few other pixels are not "a small component"
    confidence = np.full((3, 3), 0.99)
    confidence[0, 0] = 0.5
    stats = PseudoLabelStats(2)
    out = pseudo_label_map(
        probs_from(np.ones((3, 3), dtype=np.int64), confidence, 2),
        0.9,
        min_component=2,
        stats=stats,
    )
    assert out[0, 0] == IGNORE and (out.ravel()[1:] == 1).all() and stats.removed_components == 0


def test_mode_filter_smooths_confident_pixels_only():
    label = np.ones((3, 4), dtype=np.int64)
    label[1, 1] = 2
    confidence = np.full((3, 4), 0.99)
    confidence[:, 3] = 0.5  # an ignored column: neither votes nor changes
    probs = probs_from(label, confidence, 3)
    out = pseudo_label_map(probs, 0.9, apply_mode_filter=True)
    assert out.tolist() == [[1, 1, 1, IGNORE]] * 3
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.3), size=(20, 30)).transpose(2, 0, 1)
    np.testing.assert_array_equal(
        pseudo_label_map(probs, 0.6, apply_mode_filter=True),
        mode_filter(pseudo_label_map(probs, 0.6), ignore_label=IGNORE),
    )


def test_label_map_errors():
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        pseudo_label_map(np.zeros((4, 4)), 0.5)
    with pytest.raises(ValueError, match="thresholds must lie in"):
        pseudo_label_map(HAND_PROBS, 1.5)
    with pytest.raises(ValueError, match="label 3"):
        pseudo_label_map(HAND_PROBS, 0.5, class_thresholds={3: 0.5})
    with pytest.raises(ValueError, match="ignore_label"):
        pseudo_label_map(HAND_PROBS, 0.5, ignore_label=2)
    bad = HAND_PROBS.copy()
    bad[:, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pseudo_label_map(bad, 0.5)


# ------------------------------------------------------------------------------ the writer

H, W = 10, 12
CLASSES = ["Background", "cat three", "cat seven"]  # json ids 3 -> label 1, 7 -> label 2


@pytest.fixture
def source(tmp_path):
    """Images a/x.jpg, b/x.jpg (same stem, other folder), b/y.jpg; categories 7 and 3
    (non-contiguous, not in id order); per-image probabilities."""
    root = tmp_path / "data"
    names = ["a/x.jpg", "b/x.jpg", "b/y.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(root / name)
    data = {
        "images": [
            {"id": 10 + i, "file_name": n, "height": H, "width": W, "license": 0}
            for i, n in enumerate(names)
        ],
        "categories": [
            {"id": 7, "name": "cat seven", "supercategory": "s"},
            {"id": 3, "name": "cat three"},
        ],
        "annotations": [],
    }
    json_file = root / "test.json"
    json_file.write_text(json.dumps(data))

    label = np.zeros((H, W), dtype=np.int64)
    confidence = np.full((H, W), 0.95)
    label[2:6, 2:7] = 1
    label[5:10, 6:12] = 2  # overlaps the class-1 block's last row
    confidence[7, 8:10] = 0.6  # an ignored hole inside class 2
    confidence[0, :] = 0.5  # an ignored top row
    second = np.zeros((H, W), dtype=np.int64)
    second[:, 8:] = 2
    probs = {
        "a/x.jpg": probs_from(label, confidence, 3),
        "b/x.jpg": probs_from(second, 0.91, 3),
        "b/y.jpg": probs_from(second, 0.5, 3),  # no confident pixel: left out
    }
    return root, json_file, probs


def write_split(out, json_file, probs, root=None, **kwargs):
    with PseudoLabelWriter(
        str(out), str(json_file), CLASSES, 0.9, image_root=root and str(root), **kwargs
    ) as w:
        for name in reversed(list(probs)):  # any order
            w.add(name, probs[name])
        report = w.close()
    return report


def test_writer_outputs(source, tmp_path):
    root, json_file, probs = source
    before = sha(json_file)
    out = tmp_path / "pseudo"
    report = write_split(out, json_file, probs, root)
    assert sha(json_file) == before
    assert sorted(os.listdir(tmp_path)) == ["data", "pseudo"]  # no temporary folder left
    data = json.loads((out / "pseudo.json").read_text())
    src = json.loads(json_file.read_text())
    assert data["categories"] == src["categories"]
    # the source's entries (ids, file_names, sizes, other keys) + sem_seg_file_name, json order
    assert data["images"] == [
        dict(src["images"][0], sem_seg_file_name="labels/a/x.jpg.png"),
        dict(src["images"][1], sem_seg_file_name="labels/b/x.jpg.png"),
    ]
    assert (
        data["pseudo_labels"]["ignore_label"] == IGNORE
        and data["pseudo_labels"]["threshold"] == 0.9
    )
    assert (
        len({a["id"] for a in data["annotations"]})
        == len(data["annotations"])
        == report["annotations"]
    )
    to_label = {3: 1, 7: 2}
    for img in data["images"]:
        png = np.asarray(Image.open(out / img["sem_seg_file_name"]))
        expected = pseudo_label_map(probs[img["file_name"]], 0.9)
        assert png.dtype == np.uint8 and png.tolist() == expected.tolist()
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert {a["category_id"] for a in anns} <= {3, 7}
        record = {
            "height": H,
            "width": W,
            "annotations": [dict(a, category_id=to_label[a["category_id"]]) for a in anns],
        }
        confident_objects = np.where((expected == 0) | (expected == IGNORE), 0, expected)
        assert record_to_label_map(record).tolist() == confident_objects.tolist()
    first = np.asarray(Image.open(out / "labels/a/x.jpg.png"))
    assert (first[0] == IGNORE).all() and (first[7, 8:10] == IGNORE).all() and (first[7, 7] == 2)
    assert report["images_in_json"] == 2 and report["images_without_confident_pixels"] == 1
    assert report["examples_without_confident_pixels"] == ["b/y.jpg"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    stats = report["stats"]
    assert stats["images"] == 3 and stats["total_pixels"] == 3 * H * W
    assert [c["pseudo_pixels"] for c in stats["per_class"]] == [
        sum(int((pseudo_label_map(p, 0.9) == c).sum()) for p in probs.values()) for c in range(3)
    ]
    assert not (out / "labels/b/y.jpg.png").exists()


def test_writer_is_atomic(source, tmp_path):
    _, json_file, probs = source
    out = tmp_path / "pseudo"
    with pytest.raises(RuntimeError, match="boom"):
        with PseudoLabelWriter(str(out), str(json_file), CLASSES, 0.9) as w:
            w.add("a/x.jpg", probs["a/x.jpg"])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["data"]
    with pytest.raises(ValueError, match=r"never added: b/y\.jpg"):
        with PseudoLabelWriter(str(out), str(json_file), CLASSES, 0.9) as w:
            w.add("a/x.jpg", probs["a/x.jpg"])
            w.add("b/x.jpg", probs["b/x.jpg"])
    assert sorted(os.listdir(tmp_path)) == ["data"]
    with pytest.raises(ValueError, match=r"b/x\.jpg: probabilities of shape"):
        with PseudoLabelWriter(str(out), str(json_file), CLASSES, 0.9) as w:
            w.add("b/x.jpg", probs["b/x.jpg"][:, :5])
    assert sorted(os.listdir(tmp_path)) == ["data"]

    # an existing output is kept unless overwrite; with overwrite it is replaced when complete
    write_split(out, json_file, probs)
    with pytest.raises(FileExistsError, match="exists"):
        PseudoLabelWriter(str(out), str(json_file), CLASSES, 0.9)
    (out / "marker").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with PseudoLabelWriter(str(out), str(json_file), CLASSES, 0.5, overwrite=True) as w:
            raise RuntimeError("boom")
    assert (out / "marker").exists()
    write_split(out, json_file, probs, overwrite=True, min_component=4)
    assert not (out / "marker").exists()
    assert json.loads((out / "pseudo.json").read_text())["pseudo_labels"]["min_component"] == 4
    assert sorted(os.listdir(tmp_path)) == ["data", "pseudo"]


def test_writer_errors(source, tmp_path):
    root, json_file, probs = source
    with pytest.raises(ValueError, match="do not match the probabilities' classes"):
        PseudoLabelWriter(
            str(tmp_path / "o"), str(json_file), ["Background", "cat seven", "cat three"], 0.9
        )
    with pytest.raises(ValueError, match="contains the source json"):
        PseudoLabelWriter(str(root), str(json_file), CLASSES, 0.9, overwrite=True)
    with PseudoLabelWriter(str(tmp_path / "o"), str(json_file), CLASSES, 0.9) as w:
        with pytest.raises(KeyError, match="c/z.jpg is not an image"):
            w.add("c/z.jpg", probs["a/x.jpg"])
        w.add("a/x.jpg", probs["a/x.jpg"])
        with pytest.raises(ValueError, match="added twice"):
            w.add("a/x.jpg", probs["a/x.jpg"])
        w.abort()
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="no image"):
        with PseudoLabelWriter(
            str(tmp_path / "o"), str(json_file), CLASSES, 0.9, image_root=str(tmp_path)
        ) as w:
            w.add("a/x.jpg", probs["a/x.jpg"])
    data = json.loads(json_file.read_text())
    data["images"][2]["file_name"] = "a/./x.jpg"  # same label file as a/x.jpg
    collide = tmp_path / "collide.json"
    collide.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"collide\.json.*share the label file labels/a/x\.jpg\.png"
    ):
        PseudoLabelWriter(str(tmp_path / "o"), str(collide), CLASSES, 0.9)
    assert sorted(os.listdir(tmp_path)) == ["collide.json", "data"]


# ------------------------------------------------------------------------------ registration +
# mapper


@pytest.fixture(scope="module")
def trash(tmp_path_factory):
    """Synthetic trash data (3 test images of 32x32) and block-structured test probabilities."""
    base = tmp_path_factory.mktemp("pl_trash")
    root = base / "data"
    generate_synthetic_trash(str(root), num_train=2, num_val=1, num_test=3, image_size=32, seed=0)
    rng = np.random.default_rng(0)
    probs = {}
    for img in json.loads((root / "test.json").read_text())["images"]:
        blocks = rng.integers(0, 11, size=(4, 4))
        label = np.kron(blocks, np.ones((8, 8), dtype=np.int64))
        label[rng.integers(0, 32, 6), rng.integers(0, 32, 6)] = rng.integers(0, 11, 6)  # salt
        confidence = np.kron(rng.choice([0.5, 0.97], size=(4, 4)), np.ones((8, 8)))
        probs[img["file_name"]] = probs_from(label, confidence, 11)
    return root, probs


def test_registration_and_train_mapper(trash, tmp_path, unregister):
    root, probs = trash
    out = tmp_path / "pseudo"
    with PseudoLabelWriter(
        str(out), str(root / "test.json"), TRASH_CLASSES, 0.9, image_root=str(root)
    ) as w:
        for name in w.file_names:
            w.add(name, probs[name])
    cfg = get_project_cfg()
    cfg.DATASETS.PSEUDO_LABELS = [["pl_pseudo", str(out / "pseudo.json"), str(root)]]
    assert register_pseudo_labels_from_cfg(cfg) == ["pl_pseudo"]
    unregister.append("pl_pseudo")
    assert register_pseudo_labels_from_cfg(cfg) == ["pl_pseudo"]  # idempotent
    meta = MetadataCatalog.get("pl_pseudo")
    assert meta.stuff_classes == list(TRASH_CLASSES) and meta.stuff_colors == list(TRASH_COLORS)
    assert (meta.ignore_label, meta.evaluator_type, meta.has_ground_truth) == (
        IGNORE,
        "lb_sem_seg",
        True,
    )
    records = DatasetCatalog.get("pl_pseudo")
    src = json.loads((root / "test.json").read_text())["images"]
    assert [r["image_id"] for r in records] == [i["id"] for i in src]
    assert [r["file_name"] for r in records] == [str(root / i["file_name"]) for i in src]
    assert all(Path(r["sem_seg_file_name"]).is_file() and "annotations" not in r for r in records)

    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    mapper = MaskFormerSemanticDatasetMapper(cfg, True)
    for record in records:
        label = pseudo_label_map(probs[record["file_name"][len(str(root)) + 1 :]], 0.9).astype(
            np.int64
        )
        out_dict = mapper(record)
        sem_seg = out_dict["sem_seg"].numpy()
        assert sem_seg.tolist() in (label.tolist(), label[:, ::-1].tolist())  # random flip
        assert (sem_seg == IGNORE).sum() == (label == IGNORE).sum() > 0
        confident = sorted(set(np.unique(label).tolist()) - {IGNORE})
        assert out_dict["instances"].gt_classes.tolist() == confident
        for cls, mask in zip(out_dict["instances"].gt_classes, out_dict["instances"].gt_masks):
            assert torch.equal(mask, torch.as_tensor(sem_seg == int(cls)))


def test_registration_errors(trash, tmp_path, unregister):
    root, probs = trash
    out = tmp_path / "pseudo"
    with PseudoLabelWriter(str(out), str(root / "test.json"), TRASH_CLASSES, 0.9) as w:
        for name in w.file_names:
            w.add(name, probs[name])
    cfg = get_project_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    cfg.DATASETS.PSEUDO_LABELS = [["pl_bad", str(out / "pseudo.json"), str(root)]]
    with pytest.raises(ValueError, match="written with ignore label 255"):
        register_pseudo_labels_from_cfg(cfg)
    cfg.DATASETS.PSEUDO_LABELS = [["pl_bad", str(out / "pseudo.json")]]
    with pytest.raises(ValueError, match=r"\[name, pseudo_json, image_root\]"):
        register_pseudo_labels_from_cfg(cfg)
    with pytest.raises(ValueError, match="not a pseudo-label json"):
        register_pseudo_label_dataset("pl_bad", str(root / "test.json"), str(root))
    register_pseudo_label_dataset("pl_missing", str(out / "pseudo.json"), str(root))
    unregister.append("pl_missing")
    first = json.loads((out / "pseudo.json").read_text())["images"][0]["sem_seg_file_name"]
    os.remove(out / first)
    with pytest.raises(ValueError, match=rf"pseudo\.json: 1 problem.*no label file .*{first}"):
        DatasetCatalog.get("pl_missing")


# ------------------------------------------------------------------------------ the command line


def write_dump(folder, probs):
    with ProbDumpWriter(str(folder), TRASH_CLASSES, model_name="test") as w:
        for name, p in probs.items():
            w.add(name, p)


def test_cli_end_to_end(trash, tmp_path, unregister):
    root, probs = trash
    # a second model that agrees with the first on the left half of every image only
    other = {}
    for name, p in probs.items():
        label = p.argmax(0)
        label[:, 16:] = (label[:, 16:] + 1) % 11
        other[name] = probs_from(label, 0.9, 11)
    write_dump(tmp_path / "dump_a", probs)
    write_dump(tmp_path / "dump_b", other)
    before = sha(root / "test.json")
    out = tmp_path / "pseudo"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "pseudo_label.py"),
        "--dumps",
        str(tmp_path / "dump_a"),
        str(tmp_path / "dump_b"),
        "--weights",
        "3",
        "1",
        "--json",
        str(root / "test.json"),
        "--image-root",
        str(root),
        "--output",
        str(out),
        "--threshold",
        "0.8",
        "--class-thresholds",
        "3=0.4",
        "--min-component",
        "4",
        "--mode-filter",
        "--name",
        "cli_pseudo",
    ]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sha(root / "test.json") == before
    report = json.loads((out / "report.json").read_text())
    assert report["settings"] == {
        "threshold": 0.8,
        "class_thresholds": {"3": 0.4},
        "min_component": 4,
        "mode_filter": True,
        "ignore_label": IGNORE,
    }
    assert (
        "Paper pack" in proc.stdout
        and f"{report['stats']['confident_fraction']:.3f}" in proc.stdout
    )
    data = json.loads((out / "pseudo.json").read_text())
    filter_changed = second_model_changed = False
    for img in data["images"]:
        # the dumps hold float16; the vote is 0.75 a + 0.25 b in float32
        a, b = (d[img["file_name"]].astype(np.float16).astype(np.float32) for d in (probs, other))
        vote = a * np.float32(0.75) + b * np.float32(0.25)
        options = dict(min_component=4, class_thresholds={3: 0.4})
        expected = pseudo_label_map(vote, 0.8, apply_mode_filter=True, **options)
        assert np.asarray(Image.open(out / img["sem_seg_file_name"])).tolist() == expected.tolist()
        filter_changed |= (pseudo_label_map(vote, 0.8, **options) != expected).any()
        second_model_changed |= (
            pseudo_label_map(a, 0.8, apply_mode_filter=True, **options) != expected
        ).any()
    assert filter_changed and second_model_changed  # both made a difference on these images
    # the printed overrides register the split
    line = next(s for s in proc.stdout.splitlines() if "DATASETS.PSEUDO_LABELS" in s)
    tokens = line.split('"')
    cfg = get_project_cfg()
    cfg.merge_from_list([tokens[0].strip(), tokens[1], tokens[2].strip(), tokens[3]])
    assert cfg.DATASETS.TRAIN == ("trash_train", "cli_pseudo")
    assert ast.literal_eval(tokens[1]) == [["cli_pseudo", str(out / "pseudo.json"), str(root)]]
    unregister.extend(register_pseudo_labels_from_cfg(cfg))
    assert len(DatasetCatalog.get("cli_pseudo")) == len(data["images"]) > 0


def test_cli_errors(trash, tmp_path):
    root, probs = trash
    write_dump(tmp_path / "dump", dict(list(probs.items())[:2]))
    from mask2former.cli.pseudo_label import main

    missing = list(probs)[2]
    with pytest.raises(
        ValueError, match=rf"1 image\(s\) of .*test\.json are not in the dumps.*{missing}"
    ):
        main(
            [
                "--dumps",
                str(tmp_path / "dump"),
                "--json",
                str(root / "test.json"),
                "--image-root",
                str(root),
                "--output",
                str(tmp_path / "out"),
            ]
        )
    assert sorted(os.listdir(tmp_path)) == ["dump"]
    index = sha(tmp_path / "dump" / "index.json")
    with pytest.raises(SystemExit):  # argparse error: the output would replace the dump
        main(
            [
                "--dumps",
                str(tmp_path / "dump"),
                "--json",
                str(root / "test.json"),
                "--image-root",
                str(root),
                "--output",
                str(tmp_path),
                "--overwrite",
            ]
        )
    assert sha(tmp_path / "dump" / "index.json") == index
    with pytest.raises(SystemExit, match="LABEL=THRESHOLD"):
        main(
            [
                "--dumps",
                str(tmp_path / "dump"),
                "--json",
                str(root / "test.json"),
                "--image-root",
                str(root),
                "--output",
                str(tmp_path / "out"),
                "--class-thresholds",
                "9:0.7",
            ]
        )
    assert sorted(os.listdir(tmp_path)) == ["dump"]


def test_pseudo_json_is_refused_as_a_plain_coco_dataset(tmp_path):
    from mask2former.data import register_coco_semseg

    json_file = tmp_path / "pseudo.json"
    json_file.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [],
                "categories": [],
                "pseudo_labels": {"ignore_label": 255},
            }
        )
    )
    with pytest.raises(ValueError, match="DATASETS.PSEUDO_LABELS"):
        register_coco_semseg("pl_as_coco", str(json_file), str(tmp_path))
