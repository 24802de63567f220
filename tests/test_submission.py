"""Submission CSV: nearest resize convention, byte format, order, atomic writing, validation,
round trip, and gathering from two gloo processes."""

import json
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mask2former.data.coco import coco_image_names
from mask2former.inference import submission
from mask2former.inference.submission import (
    HEADER,
    SubmissionWriter,
    format_prediction,
    nearest_indices,
    read_submission,
    resize_nearest,
)

# test.json order is neither sorted by name nor by id.
TEST_IMAGES = [
    {"id": 7, "file_name": "batch_03/0010.jpg"},
    {"id": 2, "file_name": "batch_01_vt/0002.jpg"},
    {"id": 5, "file_name": "batch_02_vt/0001.jpg"},
]
NAMES = [image["file_name"] for image in TEST_IMAGES]


@pytest.fixture
def test_json(tmp_path):
    path = tmp_path / "test.json"
    images = [dict(image, height=40, width=30) for image in TEST_IMAGES]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return str(path)


def label_maps(seed=0, num_classes=11):
    """One random (40, 30) label map per test image."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, num_classes, size=(40, 30)) for name in NAMES}


def leftovers(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------ nearest resize


def brute_force_resize(label_map, size):
    """Pixel by pixel, the exact rational rule: out[y, x] = in[floor(y*H/size), floor(x*W/size)]."""
    h, w = label_map.shape
    out = np.empty((size, size), dtype=label_map.dtype)
    for y in range(size):
        for x in range(size):
            out[y, x] = label_map[(y * h) // size, (x * w) // size]
    return out


@pytest.mark.parametrize("shape", [(512, 512), (500, 375), (1024, 768), (300, 40), (7, 3)])
def test_resize_nearest_matches_brute_force_and_cv2(shape):
    rng = np.random.default_rng(1)
    label_map = rng.integers(0, 11, size=shape).astype(np.uint8)
    resized = resize_nearest(label_map, 256)
    np.testing.assert_array_equal(resized, brute_force_resize(label_map, 256))
    cv2_resized = cv2.resize(label_map, (256, 256), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resized, cv2_resized)


def test_nearest_indices_hand_values():
    np.testing.assert_array_equal(nearest_indices(512, 256)[:4], [0, 2, 4, 6])
    assert nearest_indices(512, 256)[-1] == 510
    np.testing.assert_array_equal(nearest_indices(3, 7), [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(nearest_indices(2, 5), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(nearest_indices(1, 4), [0, 0, 0, 0])
    with pytest.raises(ValueError):
        nearest_indices(0, 4)


def test_nearest_indices_follow_cv2_where_float_rounding_differs_from_exact():
    """cv2 computes floor(i * (1 / (dst / src))) in doubles; for 2 -> 98 that drops below the
    exact value at some i. The submission must follow cv2 (the baseline's albumentations)."""
    exact = (np.arange(98) * 2) // 98
    ours = nearest_indices(2, 98)
    assert (ours != exact).any()
    row = cv2.resize(np.array([[0, 1]], dtype=np.uint8), (98, 1), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(ours, row[0])
    # And every (src, dst) pair on a grid, plus common image sizes to 256.
    pairs = [(s, d) for s in range(1, 41) for d in range(1, 41)]
    pairs += [(s, 256) for s in (100, 186, 333, 480, 512, 640, 1080, 1920)]
    for src, dst in pairs:
        src_row = np.arange(src, dtype=np.int32)[None, :]
        expected = cv2.resize(src_row, (dst, 1), interpolation=cv2.INTER_NEAREST)[0]
        np.testing.assert_array_equal(nearest_indices(src, dst), expected, err_msg=f"{src}->{dst}")


def test_resize_nearest_keeps_dtype_and_large_labels():
    label_map = np.array([[0, 300], [70000, 5]], dtype=np.int64)
    np.testing.assert_array_equal(
        resize_nearest(label_map, (2, 4)), [[0, 0, 300, 300], [70000, 70000, 5, 5]]
    )
    assert resize_nearest(label_map, 3).dtype == np.int64


# ------------------------------------------------------------------------------ row format


def test_format_prediction_equals_str_join():
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 11, size=(256, 256))
    assert format_prediction(mask) == " ".join(str(v) for v in mask.ravel()).encode()
    edge = np.array([[0, 9, 10, 99], [100, 255, 256, 65535]])
    assert format_prediction(edge) == b"0 9 10 99 100 255 256 65535"
    assert format_prediction(np.array([[3]], dtype=np.uint8)) == b"3"
    # Row-major even for a Fortran-ordered / transposed view.
    assert format_prediction(np.array([[1, 2], [3, 4]]).T) == b"1 3 2 4"
    with pytest.raises(ValueError, match="labels must lie in"):
        format_prediction(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="labels must lie in"):
        format_prediction(np.array([[65536]]))
    with pytest.raises(ValueError, match="integers"):
        format_prediction(np.array([[0.5]]))


# ------------------------------------------------------------------------------ writer


def test_writer_format_order_and_round_trip(test_json, tmp_path):
    names = coco_image_names(test_json)
    assert list(names.items()) == [(7, NAMES[0]), (2, NAMES[1]), (5, NAMES[2])]
    maps = label_maps()
    path = tmp_path / "out" / "submission.csv"
    with SubmissionWriter(str(path), list(names.values())) as writer:
        for name in reversed(NAMES):  # out of order
            writer.add(name, maps[name])
        assert len(writer) == 3

    lines = path.read_text().split("\n")
    assert lines[0] == HEADER == "image_id,PredictionString"
    assert lines[-1] == "" and len(lines) == 1 + 3 + 1  # header, 3 rows, final newline
    for line, name in zip(lines[1:4], NAMES):
        image_id, prediction = line.split(",")
        assert image_id == name
        values = prediction.split(" ")
        assert len(values) == 65536 and all(v.isdigit() for v in values)
        np.testing.assert_array_equal(
            np.array(values, dtype=int).reshape(256, 256), brute_force_resize(maps[name], 256)
        )

    read_names, masks = read_submission(str(path))
    assert read_names == NAMES
    assert masks.shape == (3, 256, 256) and masks.dtype == np.uint8
    for mask, name in zip(masks, NAMES):
        np.testing.assert_array_equal(mask, resize_nearest(maps[name], 256))
    assert leftovers(path.parent) == []


def test_writer_quotes_names_with_commas(tmp_path):
    names = ["a,b.jpg", 'say "hi".jpg', "plain.jpg"]
    path = str(tmp_path / "s.csv")
    with SubmissionWriter(path, names, size=2) as writer:
        for i, name in enumerate(names):
            writer.add(name, np.full((3, 3), i))
    with open(path) as f:
        assert f.read().splitlines()[1:3] == ['"a,b.jpg",0 0 0 0', '"say ""hi"".jpg",1 1 1 1']
    read_names, masks = read_submission(path, size=2)
    assert read_names == names
    np.testing.assert_array_equal(masks[:, 0, 0], [0, 1, 2])


def test_missing_image_is_a_clear_error_and_writes_nothing(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("previous file\n")
    maps = label_maps()
    writer = SubmissionWriter(str(path), NAMES)
    writer.add(NAMES[0], maps[NAMES[0]])
    with pytest.raises(ValueError, match=r"2 of 3 images have no prediction.*batch_01_vt/0002"):
        writer.close()
    assert path.read_text() == "previous file\n"
    assert leftovers(tmp_path) == []


def test_exception_in_block_writes_nothing(tmp_path):
    path = tmp_path / "submission.csv"
    maps = label_maps()
    with pytest.raises(RuntimeError, match="model crashed"):
        with SubmissionWriter(str(path), NAMES) as writer:
            for name in NAMES:
                writer.add(name, maps[name])
            raise RuntimeError("model crashed")
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    path.write_text("previous file\n")
    calls = []

    def failing_format(mask):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return format_prediction(mask)

    monkeypatch.setattr(submission, "format_prediction", failing_format)
    maps = label_maps()
    with pytest.raises(OSError, match="disk full"):
        with SubmissionWriter(str(path), NAMES) as writer:
            for name in NAMES:
                writer.add(name, maps[name])
    assert len(calls) == 2  # the first row had been written to the temporary file
    assert path.read_text() == "previous file\n"
    assert leftovers(tmp_path) == []


def test_writer_rejects_bad_use(tmp_path):
    with pytest.raises(ValueError, match="duplicates"):
        SubmissionWriter(str(tmp_path / "s.csv"), ["a.jpg", "a.jpg"])
    with pytest.raises(ValueError, match="line breaks"):
        SubmissionWriter(str(tmp_path / "s.csv"), ["a\n.jpg"])
    writer = SubmissionWriter(str(tmp_path / "s.csv"), NAMES)
    with pytest.raises(KeyError, match="unknown.jpg"):
        writer.add("unknown.jpg", np.zeros((4, 4), int))
    writer.add(NAMES[0], np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="added twice"):
        writer.add(NAMES[0], np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="labels must lie in"):
        writer.add(NAMES[1], -np.ones((4, 4), int))
    with pytest.raises(ValueError, match="2-D"):
        writer.add(NAMES[1], np.zeros((3, 4, 4), int))


def test_read_submission_validates(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,pred\na.jpg,0 0 0 0\n")
    with pytest.raises(ValueError, match="header"):
        read_submission(str(path), size=2)
    path.write_text(f"{HEADER}\na.jpg,0 0 0 0\nb.jpg,0 1 1\n")
    with pytest.raises(ValueError, match=r":3 \('b.jpg'\): 3 labels, expected 4"):
        read_submission(str(path), size=2)
    path.write_text(f"{HEADER}\na.jpg,0 0 x 0\n")
    with pytest.raises(ValueError, match="unreadable"):
        read_submission(str(path), size=2)
    path.write_text(f"{HEADER}\na.jpg,0 0 300 0\n")
    names, masks = read_submission(str(path), size=2)
    assert names == ["a.jpg"] and masks.dtype == np.uint16 and masks[0, 1, 0] == 300


# ------------------------------------------------------------------------------ two processes


def _writer_worker(rank, world_size, init_method, path):
    # Forked after the parent used torch's OpenMP pool: one thread, as DataLoader workers do,
    # or the first parallel op can hang.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        maps = label_maps()
        writer = SubmissionWriter(path, NAMES, distributed=True)
        for name in reversed(NAMES[rank::world_size]):
            writer.add(name, maps[name])
        result = writer.close()
        with open(f"{path}.rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_write_one_file_in_order(tmp_path):
    path = str(tmp_path / "submission.csv")
    mp.start_processes(
        _writer_worker,
        args=(2, f"file://{tmp_path / 'pg_init'}", path),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    with open(f"{path}.rank0.pkl", "rb") as f:
        assert pickle.load(f) == path
    with open(f"{path}.rank1.pkl", "rb") as f:
        assert pickle.load(f) is None
    names, masks = read_submission(path)
    assert names == NAMES
    maps = label_maps()
    for mask, name in zip(masks, NAMES):
        np.testing.assert_array_equal(mask, brute_force_resize(maps[name], 256))
