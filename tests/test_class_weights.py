"""Per-class weights (MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE / CLASS_WEIGHTS): the weighted
classification loss and matching cost against hand computations, inverse-sqrt-frequency weights
against a NumPy computation on label maps built here, the default config unchanged, no training
data read when the model is built, and a tiny train_net.py run."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from PIL import Image

from mask2former.data.catalog import TRASH_CLASSES
from mask2former.data.class_frequency import (
    dataset_class_weights,
    inverse_sqrt_frequency_weights,
    pixel_class_counts,
)
from mask2former.data.offline.synthetic import generate_synthetic_trash
from mask2former.engine import build_cfg
from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.matcher import HungarianMatcher
from mask2former.modeling.meta_arch import MaskFormer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml"
IGNORE = 255


class RecordingMatcher:
    """A fixed assignment; keeps the class weights it is given."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(i), torch.tensor(j)) for i, j in indices]
        self.class_weights = None

    def set_class_weights(self, weights):
        self.class_weights = torch.as_tensor(weights)

    def __call__(self, outputs, targets):
        return self.indices


def labels_only_criterion(matcher, num_classes, eos, **kwargs):
    return SetCriterion(
        num_classes, matcher, {"loss_ce": 1.0}, eos, ["labels"], 16, 3.0, 0.75, **kwargs
    )


def test_weighted_cross_entropy_equals_hand_computation():
    # 2 classes + "no object"; 3 queries: q0 -> class 1, q1 -> class 0, q2 unmatched (no object)
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [0.3, -0.2, 1.5]])
    weights, eos = [0.5, 3.0], 0.2
    matcher = RecordingMatcher([([0, 1], [0, 1])])
    criterion = labels_only_criterion(matcher, 2, eos, class_weights=weights)
    outputs = {
        "pred_logits": torch.tensor(logits[None], dtype=torch.float32),
        "pred_masks": torch.zeros(1, 3, 4, 4),
    }
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.zeros(2, 4, 4)}]
    loss = criterion(outputs, targets)["loss_ce"].item()

    classes = [1, 0, 2]
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -log_softmax[np.arange(3), classes]
    w = np.array([weights[1], weights[0], eos])
    assert loss == pytest.approx((w * ce).sum() / w.sum(), rel=1e-6)
    # the matcher received the same K weights; "no object" keeps eos_coef
    assert matcher.class_weights.tolist() == weights
    assert criterion.ce_class_weights().tolist() == pytest.approx([0.5, 3.0, 0.2])


def test_matcher_class_cost_is_weighted_by_the_target_class():
    probs = np.array([[0.2, 0.3, 0.5], [0.55, 0.4, 0.05]])  # 2 queries, classes 0, 1, no object
    outputs = {
        "pred_logits": torch.tensor(np.log(probs)[None], dtype=torch.float32),
        "pred_masks": torch.zeros(1, 2, 4, 4),
    }
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4)}]
    weights = [0.1, 1.0]
    plain = HungarianMatcher(cost_class=1, cost_mask=0, cost_dice=0, num_points=4)
    weighted = HungarianMatcher(
        cost_class=1, cost_mask=0, cost_dice=0, num_points=4, class_weights=weights
    )

    cost = weighted.cost_matrix(
        outputs["pred_logits"][0],
        outputs["pred_masks"][0],
        targets[0]["labels"],
        targets[0]["masks"],
    )
    expected = -np.array([[0.1 * 0.2, 1.0 * 0.3], [0.1 * 0.55, 1.0 * 0.4]])
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-5)

    # unweighted: q0 -> t1, q1 -> t0 (0.3 + 0.55 > 0.2 + 0.4); weighted: q0 -> t0, q1 -> t1
    # (0.1 * 0.2 + 0.4 = 0.42 > 0.1 * 0.55 + 0.3 = 0.355)
    ((rows, cols),) = plain(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    ((rows, cols),) = weighted(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def write_label_png(path, label):
    Image.fromarray(label.astype(np.uint8)).save(path)
    return {
        "file_name": str(path).replace(".png", ".jpg"),
        "sem_seg_file_name": str(path),
        "height": label.shape[0],
        "width": label.shape[1],
    }


def synthetic_label_records(tmp_path):
    """Two label maps with classes 0, 1, 3 of 4 (class 2 absent) and ignored pixels."""
    rng = np.random.default_rng(0)
    maps = [
        rng.choice([0, 0, 0, 1, 3, IGNORE], size=(7, 9)),
        rng.choice([0, 3, 3, IGNORE], size=(5, 6)),
    ]
    records = [write_label_png(tmp_path / f"{i}.png", m) for i, m in enumerate(maps)]
    return records, maps


def test_inverse_sqrt_frequency_hand_values():
    # fractions 1/21, 4/21, -, 16/21: 1/sqrt(f) proportional to 1, 1/2, 1/4 (mean 7/12)
    weights, absent = inverse_sqrt_frequency_weights([1, 4, 0, 16])
    np.testing.assert_allclose(weights, [12 / 7, 6 / 7, 1.0, 3 / 7], rtol=1e-12)
    assert absent == [2]


def test_inverse_sqrt_frequency_from_records_equals_numpy(tmp_path):
    records, maps = synthetic_label_records(tmp_path)
    pixels = np.concatenate([m.ravel() for m in maps])
    pixels = pixels[pixels != IGNORE]
    expected_counts = np.array([(pixels == c).sum() for c in range(4)])
    counts = pixel_class_counts(records, 4, IGNORE)
    assert counts.tolist() == expected_counts.tolist() and counts[2] == 0

    f = expected_counts / expected_counts.sum()
    present = f > 0
    expected = np.ones(4)
    expected[present] = f[present] ** -0.5 / np.mean(f[present] ** -0.5)

    name = "class_weights_test_records"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=["bg", "can", "jar", "box"])
    logger = logging.getLogger("mask2former.data.class_frequency")
    handler = _ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        weights = dataset_class_weights([name], 4, IGNORE)
    finally:
        logger.removeHandler(handler)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert np.mean(np.asarray(weights)[present]) == pytest.approx(1.0)
    log = "\n".join(handler.messages)
    assert "| class" in log and all(c in log for c in ("bg", "can", "jar", "box"))
    assert "absent" in log and "jar" in log.split("absent")[1]


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_label_outside_the_classes_is_an_error_naming_the_file(tmp_path):
    record = write_label_png(tmp_path / "bad.png", np.array([[0, 1], [7, IGNORE]]))
    with pytest.raises(ValueError, match=r"bad\.png.*label value 7"):
        pixel_class_counts([record], 4, IGNORE)


def tiny_cfg(*opts):
    return build_cfg(
        str(TINY_CONFIG),
        [
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
            "1",
            "MODEL.MASK_FORMER.DEC_LAYERS",
            "2",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
            "4",
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
            "64",
            "DATASETS.TRASH_ROOT",
            "",
            *opts,
        ],
    )


def test_default_config_gives_the_unweighted_losses():
    cfg = tiny_cfg()
    assert cfg.MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE == "none"
    mf = cfg.MODEL.MASK_FORMER
    reference = SetCriterion(
        11,
        HungarianMatcher(mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.TRAIN_NUM_POINTS),
        {},
        mf.NO_OBJECT_WEIGHT,
        ["labels", "masks"],
        mf.TRAIN_NUM_POINTS,
        mf.OVERSAMPLE_RATIO,
        mf.IMPORTANCE_SAMPLE_RATIO,
    )
    built = MaskFormer.build_criterion(cfg, 11)
    ones = MaskFormer.build_criterion(
        tiny_cfg(
            "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
            "list",
            "MODEL.MASK_FORMER.CLASS_WEIGHTS",
            str([1.0] * 11),
        ),
        11,
    )
    g = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 4, 12, generator=g),
        "pred_masks": torch.randn(2, 4, 8, 8, generator=g),
    }
    targets = [
        {"labels": torch.tensor([0, 5, 7]), "masks": torch.rand(3, 16, 16, generator=g) > 0.5},
        {"labels": torch.tensor([2]), "masks": torch.rand(1, 16, 16, generator=g) > 0.5},
    ]
    results = []
    for criterion in (reference, built, ones):
        torch.manual_seed(1)
        results.append(criterion(outputs, targets))
    for losses in results[1:]:
        assert losses.keys() == results[0].keys()
        for key in losses:
            assert torch.equal(losses[key], results[0][key]), key
    # and weights on a class of the targets change the classification loss
    torch.manual_seed(1)
    weighted = MaskFormer.build_criterion(
        tiny_cfg(
            "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
            "list",
            "MODEL.MASK_FORMER.CLASS_WEIGHTS",
            str([1.0] * 5 + [4.0] + [1.0] * 5),
        ),
        11,
    )
    assert weighted(outputs, targets)["loss_ce"] != results[0]["loss_ce"]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE", "inverse_sqrt"], "must be one of"),
        (
            [
                "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
                "list",
                "MODEL.MASK_FORMER.CLASS_WEIGHTS",
                "[1.0]",
            ],
            "1 values for 11 classes",
        ),
        (["MODEL.MASK_FORMER.CLASS_WEIGHTS", str([1.0] * 11)], "only used with CLASS_WEIGHTS_MODE"),
        (
            [
                "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
                "list",
                "MODEL.MASK_FORMER.CLASS_WEIGHTS",
                str([1.0] * 10 + [0.0]),
            ],
            "finite and positive",
        ),
    ],
)
def test_bad_class_weight_settings_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        MaskFormer.build_criterion(tiny_cfg(*opts), 11)


def training_batch():
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(32, 32, dtype=torch.int64)
    label[4:14, 6:20] = 3
    label[20:30, 2:12] = 7
    instances = Instances((32, 32))
    instances.gt_classes = torch.tensor([0, 3, 7])
    instances.gt_masks = torch.stack([label == c for c in (0, 3, 7)])
    image = torch.randint(0, 255, (3, 32, 32), generator=g, dtype=torch.uint8)
    return [{"image": image, "instances": instances, "sem_seg": label}]


def test_model_build_reads_no_training_data_and_first_training_step_does(tmp_path):
    records, maps = synthetic_label_records(tmp_path)
    calls = []

    def load():
        calls.append(1)
        return records

    name = "class_weights_test_lazy"
    DatasetCatalog.register(name, load)
    try:
        cfg = tiny_cfg(
            "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
            "inverse_sqrt_frequency",
            "DATASETS.TRAIN",
            f"('{name}',)",
        )
        model = build_model(cfg)  # what --eval-only and tools/predict.py do
        assert calls == []
        assert model.criterion.class_weights.tolist() == [1.0] * 11
        state = model.state_dict()
        model.eval()
        with torch.no_grad():
            model([{"image": training_batch()[0]["image"]}])
        assert calls == []
        # the weights are not part of a checkpoint: the same keys as without class weights
        assert "criterion.class_weights" not in state
        assert "criterion.matcher.class_weights" not in state

        model.train()
        model(training_batch())
        model(training_batch())
        assert calls == [1]
        counts = np.bincount(np.concatenate([m.ravel() for m in maps]), minlength=256)[:11]
        expected = np.ones(11)
        present = counts > 0
        f = counts[present] / counts.sum()
        expected[present] = f**-0.5 / np.mean(f**-0.5)
        np.testing.assert_allclose(model.criterion.class_weights.numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(
            model.criterion.matcher.class_weights.numpy(), expected, rtol=1e-6
        )
    finally:
        DatasetCatalog.remove(name)


def test_empty_training_set_builds_and_fails_clearly_when_training():
    cfg = tiny_cfg(
        "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE", "inverse_sqrt_frequency", "DATASETS.TRAIN", "()"
    )
    model = build_model(cfg)
    model.train()
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        model(training_batch())


def test_train_net_with_inverse_sqrt_frequency_logs_the_weights(tmp_path):
    size = 64
    data = tmp_path / "data"
    generate_synthetic_trash(str(data), num_train=3, num_val=1, num_test=1, image_size=size, seed=0)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "train_net.py"),
        "--config-file",
        str(TINY_CONFIG),
        "--num-gpus",
        "1",
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "0",
        "DATASETS.TRASH_ROOT",
        str(data),
        "OUTPUT_DIR",
        str(out),
        "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE",
        "inverse_sqrt_frequency",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.CHECKPOINT_PERIOD",
        "100",
        "TEST.EVAL_PERIOD",
        "0",
        "DATASETS.TEST",
        "()",
        "INPUT.MIN_SIZE_TRAIN",
        f"({size},)",
        "INPUT.CROP.SIZE",
        f"({size}, {size})",
        "INPUT.SIZE_DIVISIBILITY",
        str(size),
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
        "256",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "counting the pixels of each class in 3 records of trash_train" in log
    table = log.split("Class weights (inverse_sqrt_frequency")[1]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("|")][2:13]
    assert [row[2].strip() for row in rows] == list(TRASH_CLASSES)
    weights = np.array([float(row[5]) for row in rows])
    fractions = np.array([float(row[4]) for row in rows])
    assert np.all(weights > 0) and np.all(np.isfinite(weights))
    assert np.mean(weights[fractions > 0]) == pytest.approx(1.0, abs=1e-3)
    assert np.all(weights[fractions == 0] == 1.0)
    losses = [
        json.loads(line)["total_loss"]
        for line in (out / "metrics.json").read_text().splitlines()
        if "total_loss" in line
    ]
    assert losses and all(math.isfinite(v) for v in losses)
