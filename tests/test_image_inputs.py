"""Predicting images named by files, globs or folders: what is read (EXIF, RGBA, grayscale),
what is skipped or refused, and batched inference equal to one image at a time."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from mask2former.engine import build_cfg
from mask2former.inference.image_inputs import (
    BatchSemSegPredictor,
    ImageInput,
    collect_image_inputs,
    predict_image_files,
    predict_image_inputs,
    read_input_image,
)
from mask2former.inference.predictor import SemSegPredictor
from mask2former.inference.sinks import label_png_path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs/tiny/m2f_swin_tiny_cpu.yaml")
EXIF_ORIENTATION = 0x0112


def _pattern(height, width, seed=0):
    """Smooth colour blocks (JPEG keeps them within a few levels)."""
    rng = np.random.RandomState(seed)
    blocks = rng.randint(0, 256, (height // 8, width // 8, 3)).astype(np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))


def _save_jpeg_with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, quality=100, subsampling=0, exif=exif)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    stored = _pattern(32, 64)  # stored 32 x 64; orientation 6/8 shows it as 64 x 32
    _save_jpeg_with_orientation(root / "sub" / "rot6.jpg", stored, 6)
    _save_jpeg_with_orientation(root / "rot8.JPG", stored, 8)
    rgba = np.dstack([_pattern(24, 40, 1), np.full((24, 40), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(_pattern(16, 24, 2)[..., 0], "L").save(root / "gray.png")
    (root / "notes.txt").write_text("not an image")
    (root / "labels.json").write_text("{}")
    return root, stored, rgba


def test_folder_inputs_keys_skips_and_reading(folder, caplog):
    root, stored, rgba = folder
    with caplog.at_level("WARNING"):
        images, skipped = collect_image_inputs([str(root)])
    assert [i.key for i in images] == ["gray.png", "rgba.png", "rot8.JPG", "sub/rot6.jpg"]
    assert sorted(Path(p).name for p in skipped) == ["labels.json", "notes.txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "notes.txt" in warnings[0] and "labels.json" in warnings[0]

    by_key = {i.key: i.path for i in images}
    # EXIF orientation 6: rotate 90 degrees clockwise to display; 8: counter-clockwise
    rot6 = read_input_image(by_key["sub/rot6.jpg"])
    rot8 = read_input_image(by_key["rot8.JPG"])
    assert rot6.shape == rot8.shape == (64, 32, 3)
    for image, turns in ((rot6, -1), (rot8, 1)):
        assert np.abs(image.astype(int) - np.rot90(stored, k=turns)).mean() < 3
        assert np.abs(image.astype(int) - np.rot90(stored, k=-turns)).mean() > 30
    # RGBA drops the alpha channel, grayscale is replicated, BGR swaps the channels
    np.testing.assert_array_equal(read_input_image(by_key["rgba.png"]), rgba[..., :3])
    np.testing.assert_array_equal(read_input_image(by_key["rgba.png"], "BGR"), rgba[..., 2::-1])
    gray = read_input_image(by_key["gray.png"])
    assert gray.shape == (16, 24, 3)
    assert (gray == gray[..., :1]).all()


def test_files_and_globs_keep_the_path_as_given(folder, monkeypatch):
    root, _, _ = folder
    monkeypatch.chdir(root.parent)
    images, skipped = collect_image_inputs(["photos/sub/rot6.jpg", "photos/*.png"])
    assert [i.key for i in images] == ["photos/sub/rot6.jpg", "photos/gray.png", "photos/rgba.png"]
    assert skipped == []
    with pytest.raises(FileNotFoundError, match="photos/missing.jpg"):
        collect_image_inputs(["photos/missing.jpg"])
    with pytest.raises(FileNotFoundError, match=r"photos/\*\.bmp: the pattern matches no file"):
        collect_image_inputs(["photos/*.bmp"])
    (root.parent / "more").mkdir()
    (root.parent / "more" / "gray.png").write_bytes((root / "gray.png").read_bytes())
    with pytest.raises(ValueError, match="more/gray.png and photos/gray.png would both be named"):
        collect_image_inputs(["photos", "more"])


def test_corrupt_image_is_refused_naming_the_file(folder):
    root, _, _ = folder
    corrupt = root / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    truncated = root / "truncated.png"
    truncated.write_bytes((root / "rgba.png").read_bytes()[:60])
    for path in (corrupt, truncated):
        with pytest.raises(ValueError, match=f"{path}: unreadable image"):
            read_input_image(str(path))
    images, _ = collect_image_inputs([str(root)])
    with pytest.raises(ValueError, match="broken.jpg: unreadable image"):
        predict_image_inputs(_StubPredictor(), images, [_Recorder()], progress=False)


class _StubPredictor:
    input_format = "RGB"

    def predict_batch(self, images):
        return [torch.ones(2, *image.shape[:2]) for image in images]


class _Recorder:
    def __init__(self):
        self.added, self.closed = [], False

    def add(self, file_name, labels, probs=None):
        self.added.append((file_name, labels.copy(), probs.clone()))

    def close(self):
        self.closed = True
        return self.added


def _tiny_model():
    cfg = build_cfg(
        TINY_CONFIG,
        [
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
            "MODEL.MASK_FORMER.DEC_LAYERS", "2",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
            "INPUT.MIN_SIZE_TEST", "48",
            "INPUT.SIZE_DIVISIBILITY", "32",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # random non-zero weights everywhere, so every image differs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model.eval()


def test_batch_of_four_equals_one_at_a_time(tmp_path):
    """Images of two sizes, two test sizes and flips: batch 4 with two data-loader worker
    processes gives the probabilities and labels of batch 1 in this process, and of the plain
    predictor."""
    cfg, model = _tiny_model()
    images = []
    for index, (h, w) in enumerate([(48, 64), (40, 56), (48, 64), (48, 64), (40, 56)]):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(_pattern(h, w, seed=index)).save(path)
        images.append(ImageInput(str(path), path.name))
    results = {}
    for batch_size, workers in ((1, 0), (4, 2)):
        predictor = BatchSemSegPredictor(cfg, model, tta=False, batch_size=batch_size)
        predictor.test_sizes, predictor.flip = (40, 48), True  # 4 views of 2 sizes per image
        recorder = _Recorder()
        (results[batch_size],) = predict_image_inputs(
            predictor, images, [recorder], batch_size=batch_size, workers=workers, progress=False
        )
        assert recorder.closed
    single = SemSegPredictor(cfg, model, tta=False)
    single.test_sizes, single.flip = (40, 48), True
    one, four = results[1], results[4]
    assert [r[0] for r in one] == [r[0] for r in four] == [i.key for i in images]
    for (_, labels1, probs1), (_, labels4, probs4), image in zip(one, four, images):
        assert labels1.dtype == np.uint8 and labels1.shape == probs1.shape[1:]
        torch.testing.assert_close(probs4, probs1, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(labels4, labels1)
        reference = single(read_input_image(image.path, cfg.INPUT.FORMAT))
        torch.testing.assert_close(probs1, reference, atol=1e-6, rtol=0)
    assert len({round(p[1].sum().item(), 3) for _, _, p in one}) == len(images)  # all differ


def test_predict_cli_on_a_folder(folder, tmp_path):
    """``tools/predict.py --input FOLDER``: submission rows, dump, label PNGs and overlays named
    by the images' paths in the folder; EXIF-rotated sizes; the non-images named in a warning."""
    root, _, _ = folder
    cfg, model = _tiny_model()
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    (tmp_path / "lm" / "images").mkdir(parents=True)
    (tmp_path / "lm" / "labels").mkdir()
    classes = [f"c{i}" for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)]
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "tools" / "predict.py"),
        "--config-file", TINY_CONFIG,
        "--weights", str(weights),
        "--input", str(root),
        "--submission", str(out / "sub.csv"),
        "--probs", str(out / "probs"),
        "--labels", str(out / "labels"),
        "--overlays", str(out / "overlays"),
        "--batch-size", "2",
        "--workers", "1",
        "--",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
        "MODEL.MASK_FORMER.DEC_LAYERS", "2",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
        "INPUT.MIN_SIZE_TEST", "48",
        "INPUT.SIZE_DIVISIBILITY", "32",
        "DATASETS.TRASH_ROOT", "",
        "DATASETS.LABELMAP_SEMSEG",
        json.dumps([["photo_classes", str(tmp_path / "lm/images"), str(tmp_path / "lm/labels"),
                     classes]]),
        "DATASETS.TEST", "('photo_classes',)",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr  # Detectron2's logger prints to stdout
    assert "skipped 2 file(s) that are not images" in log
    assert "labels.json" in log and "notes.txt" in log

    keys = ["gray.png", "rgba.png", "rot8.JPG", "sub/rot6.jpg"]
    with open(out / "sub.csv") as f:
        rows = list(csv.reader(f))
    assert [row[0] for row in rows[1:]] == keys
    index = json.loads((out / "probs" / "index.json").read_text())
    assert [entry["file_name"] for entry in index["images"]] == keys
    assert index["classes"] == classes
    label = np.array(Image.open(label_png_path(str(out / "labels"), "sub/rot6.jpg")))
    assert label.shape == (64, 32) and label.dtype == np.uint8  # displayed size (EXIF applied)
    assert np.array(Image.open(label_png_path(str(out / "labels"), "rgba.png"))).shape == (24, 40)
    # named as the label PNGs: <key>.png, folders mirrored, extension kept
    overlays = sorted(
        str(p.relative_to(out / "overlays")) for p in (out / "overlays").rglob("*.png")
    )
    assert overlays == sorted(k + ".png" for k in keys)
    assert Image.open(out / "overlays" / "sub/rot6.jpg.png").size[0] == 2 * 32  # image | prediction


def test_label_pngs_need_relative_keys(folder, tmp_path):
    """An image given by an absolute path has no place in the label folder: refused before the
    model runs (the model here would fail on any call)."""
    root, _, _ = folder
    cfg, _ = _tiny_model()
    with pytest.raises(ValueError, match="not a relative path"):
        predict_image_files(
            cfg,
            _FailingModel(),
            [str(root / "gray.png")],
            class_names=[str(i) for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)],
            palette=[(i, i, i) for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)],
            labels=str(tmp_path / "labels"),
            progress=False,
        )
    assert not (tmp_path / "labels").exists()


class _FailingModel(torch.nn.Module):
    def forward(self, inputs):
        raise AssertionError("the model must not run")
