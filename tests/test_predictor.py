"""SemSegPredictor (calibration, multi-scale + flip TTA) and probability dumps."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

from dinat import add_dinat_config
from mask2former.engine import build_cfg
from mask2former.inference.predictor import (
    SemSegPredictor,
    calibrate,
    tta_sizes_off_training_scale,
)
from mask2former.inference.prob_dump import ProbDumpReader, ProbDumpWriter
from semask import add_semask_config


class ColumnModel(torch.nn.Module):
    """Scores computed at the input resolution and resized to the requested output size like a
    real semantic model: class 0 grows to the right, class 1 is constant, class 2 depends on the
    pixel values."""

    def __init__(self):
        super().__init__()
        self.seen_sizes = []

    def forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            img = x["image"].float()
            _, h, w = img.shape
            self.seen_sizes.append((h, w))
            ramp = torch.linspace(0.1, 1.0, w).expand(h, w)
            scores = torch.stack([ramp, torch.full((h, w), 0.5), 0.2 + img[0] / 255.0])
            scores = F.interpolate(
                scores[None], size=(x["height"], x["width"]), mode="bilinear", align_corners=False
            )[0]
            outs.append({"sem_seg": scores})
        return outs


def test_calibrate_sums_to_one_and_keeps_ratios():
    s = torch.rand(4, 5, 6) + 0.01
    p = calibrate(s)
    assert torch.allclose(p.sum(0), torch.ones(5, 6), atol=1e-6)
    assert torch.allclose(p[0] / p[1], s[0] / s[1], rtol=1e-5)
    with pytest.raises(ValueError):
        calibrate(torch.rand(5, 6))


def test_single_view_equals_calibrated_model_output():
    image = np.random.RandomState(0).randint(0, 255, (20, 30, 3), dtype=np.uint8)
    model = ColumnModel()
    probs = SemSegPredictor(model, test_sizes=(20,))(image)
    ref = calibrate(
        model(
            [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 20, "width": 30}]
        )[0]["sem_seg"]
    )
    assert probs.shape == (3, 20, 30)
    assert torch.allclose(probs, ref, atol=1e-6)


def test_tta_is_the_mean_of_calibrated_views_with_flip_undone():
    image = np.random.RandomState(1).randint(0, 255, (16, 24, 3), dtype=np.uint8)
    model = ColumnModel()
    predictor = SemSegPredictor(model, test_sizes=(16, 32), max_size=1000, flip=True, batch_size=3)
    probs = predictor(image)
    # the model saw both scales, each flipped and not
    assert sorted(model.seen_sizes) == [(16, 24), (16, 24), (32, 48), (32, 48)]

    # reference: each view resized by Detectron2's ResizeShortestEdge, calibrated, flipped back
    views = []
    for size in (16, 32):
        resized = T.ResizeShortestEdge(size, 1000).get_transform(image).apply_image(image)
        for flipped in (False, True):
            arr = resized[:, ::-1] if flipped else resized
            x = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            p = calibrate(ColumnModel()([{"image": x, "height": 16, "width": 24}])[0]["sem_seg"])
            views.append(p.flip(-1) if flipped else p)
    ref = torch.stack(views).double().mean(0)
    assert torch.allclose(probs.double(), ref, atol=1e-6)
    assert torch.allclose(probs.sum(0), torch.ones(16, 24), atol=1e-5)


def test_flip_tta_averages_mirrored_predictions():
    image = np.full((12, 20, 3), 100, dtype=np.uint8)  # uniform: class 2 is position-independent
    no_flip = SemSegPredictor(ColumnModel(), test_sizes=(12,))(image)
    with_flip = SemSegPredictor(ColumnModel(), test_sizes=(12,), flip=True)(image)
    assert not torch.allclose(no_flip[0], no_flip[0].flip(-1), atol=1e-3)
    assert torch.allclose(with_flip, with_flip.flip(-1), atol=1e-6)
    assert torch.allclose(with_flip[0], (no_flip[0] + no_flip[0].flip(-1)) / 2, atol=1e-6)


def test_prob_dump_round_trip_and_index(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {
        f"batch_01/{i:04d}.jpg": rng.dirichlet(np.ones(3), size=(5, 7)).transpose(2, 0, 1)
        for i in range(4)
    }
    out = tmp_path / "dump"
    with ProbDumpWriter(str(out), ["a", "b", "c"], model_name="m") as w:
        for name, arr in arrays.items():
            w.add(name, torch.from_numpy(arr))
        assert not (out / "index.json").exists()  # written only when complete
    reader = ProbDumpReader(str(out))
    assert reader.file_names == list(arrays) and reader.class_names == ["a", "b", "c"]
    for name, arr in reader:
        np.testing.assert_allclose(arr, arrays[name], atol=1e-3)
        assert arr.dtype == np.float32
    assert np.load(out / "000000.npy").dtype == np.float16
    assert reader.size_of("batch_01/0002.jpg") == (5, 7)
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    with pytest.raises(KeyError, match="not in the probability dump"):
        reader.get("nope.jpg")


def test_prob_dump_rejects_bad_input(tmp_path):
    w = ProbDumpWriter(str(tmp_path / "d"), ["a", "b"])
    with pytest.raises(ValueError, match="expected probabilities"):
        w.add("x.jpg", np.zeros((3, 4, 4)))
    w.add("x.jpg", np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="added twice"):
        w.add("x.jpg", np.zeros((2, 4, 4)))
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ProbDumpReader(str(tmp_path / "d"))
    w.close()
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["images"][0]["file_name"] == "x.jpg"


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def _config(path):
    return build_cfg(str(path), add_configs=(add_semask_config, add_dinat_config))


def test_tta_sizes_off_training_scale():
    # the tiny demo model (trained at short sides 96..192) with the 512-px base config's TTA
    off = tta_sizes_off_training_scale([384, 448, 512, 576, 640, 704, 768], [96, 192])
    assert off == [384, 448, 512, 576, 640, 704, 768]
    # 1.5x above the largest / below the smallest training side is the limit
    assert tta_sizes_off_training_scale([64, 63, 288, 289, 128], [96, 144, 192]) == [63, 289]
    assert tta_sizes_off_training_scale([135, 270], [180]) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_test_at_their_training_scale(path):
    """Every shipped config's TTA sizes lie within the tolerance of its training short sides (a
    tiny config inheriting the base's 384..768 would test a 128-px model at 3x to 6x its scale),
    and its single-scale test size within its training range."""
    cfg = _config(path)
    train = cfg.INPUT.MIN_SIZE_TRAIN
    assert tta_sizes_off_training_scale(cfg.TEST.AUG.MIN_SIZES, train) == [], path
    assert min(train) <= cfg.INPUT.MIN_SIZE_TEST <= max(train), path
    assert cfg.INPUT.MIN_SIZE_TEST in cfg.TEST.AUG.MIN_SIZES, path


def test_tta_far_from_the_training_scale_is_warned(caplog):
    cfg = _config(CONFIGS[0]).clone()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 192)
    cfg.INPUT.MIN_SIZE_TEST = 128
    with caplog.at_level(logging.WARNING, logger="mask2former.inference.predictor"):
        SemSegPredictor(cfg, ColumnModel(), tta=False)
        assert not caplog.records  # single-scale: TEST.AUG is not used
        cfg.TEST.AUG.MIN_SIZES = (96, 128, 160)
        predictor = SemSegPredictor(cfg, ColumnModel(), tta=True)
        assert predictor.test_sizes == (96, 128, 160) and not caplog.records
        cfg.TEST.AUG.MIN_SIZES = (128, 256, 384)
        SemSegPredictor(cfg, ColumnModel(), tta=True)
    (record,) = caplog.records
    assert "[384]" in record.getMessage() and "96..192" in record.getMessage()
