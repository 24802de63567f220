"""Probability dumps: a rerun replaces the previous dump only when complete, and the reader
refuses a folder whose arrays and index disagree."""

import json
import os

import numpy as np
import pytest

from mask2former.inference.prob_dump import ProbDumpReader, ProbDumpWriter

CLASSES = ["a", "b", "c"]


def _probs(seed, height=4, width=5):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(len(CLASSES)), size=(height, width)).transpose(2, 0, 1)


def _write(folder, names, seed):
    with ProbDumpWriter(str(folder), CLASSES, model_name=f"m{seed}") as w:
        for i, name in enumerate(names):
            w.add(name, _probs(seed * 100 + i))


def test_interrupted_rerun_leaves_the_previous_complete_dump(tmp_path):
    out = tmp_path / "dump"
    _write(out, ["x.jpg", "y.jpg", "z.jpg"], seed=1)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        with ProbDumpWriter(str(out), CLASSES, model_name="m2") as w:
            w.add("x.jpg", _probs(7))
            assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
            raise Killed
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["dump"]  # no temporary folder left
    reader = ProbDumpReader(str(out))
    assert reader.model_name == "m1" and reader.file_names == ["x.jpg", "y.jpg", "z.jpg"]
    np.testing.assert_allclose(reader.get("x.jpg"), _probs(100), atol=1e-3)

    # a complete rerun with fewer images replaces the whole folder: no stale arrays remain
    _write(out, ["y.jpg"], seed=2)
    reader = ProbDumpReader(str(out))
    assert reader.file_names == ["y.jpg"] and sorted(os.listdir(out)) == [
        "000000.npy",
        "index.json",
    ]
    np.testing.assert_allclose(reader.get("y.jpg"), _probs(200), atol=1e-3)


def test_reader_refuses_arrays_that_disagree_with_the_index(tmp_path):
    out = tmp_path / "dump"
    _write(out, ["x.jpg", "y.jpg"], seed=1)
    np.save(out / "000002.npy", _probs(3).astype(np.float16))  # left over from an older dump
    with pytest.raises(ValueError, match=r"not in the index: 000002\.npy"):
        ProbDumpReader(str(out))
    os.remove(out / "000002.npy")
    os.remove(out / "000001.npy")
    with pytest.raises(ValueError, match=r"missing: 000001\.npy"):
        ProbDumpReader(str(out))

    _write(out, ["x.jpg", "y.jpg"], seed=1)
    np.save(out / "000001.npy", _probs(3, height=6).astype(np.float16))
    reader = ProbDumpReader(str(out))
    with pytest.raises(ValueError, match=r"'y.jpg' holds an array of shape \(3, 6, 5\)"):
        reader.get("y.jpg")
    np.save(out / "000001.npy", _probs(3).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(float32\), its index says \(3, 4, 5\) \(float16\)"):
        reader.get("y.jpg")


def test_corrupt_array_names_its_path_and_image(tmp_path):
    out = tmp_path / "dump"
    _write(out, ["x.jpg", "y.jpg"], seed=1)
    path = out / "000001.npy"
    path.write_bytes(path.read_bytes()[:60])  # truncated
    reader = ProbDumpReader(str(out))
    with pytest.raises(ValueError, match=rf"{path}: unreadable probability array of 'y.jpg'"):
        reader.get("y.jpg")
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match=rf"{path}: unreadable probability array of 'y.jpg'"):
        reader.get("y.jpg")
    assert json.loads((out / "index.json").read_text())["images"][1]["path"] == "000001.npy"
