"""A failed or killed run of tools/ensemble.py / tools/pseudo_label.py leaves the previous
complete outputs or nothing; the next run removes the temporaries of killed runs; output names
derived from a file_name are unique (img/one.jpg and img/one.png)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from processes import dead_pid

from mask2former.data.catalog import register_coco_semseg
from mask2former.inference.prob_dump import ProbDumpWriter
from mask2former.inference.sinks import LabelPngSink, OverlaySink
from mask2former.utils.io import make_temporary_directory, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Background", "paper", "glass"]
IMAGES = [
    {"id": 1, "file_name": "img/a.png", "height": 12, "width": 16},
    {"id": 2, "file_name": "img/b.png", "height": 12, "width": 16},
    {"id": 3, "file_name": "img/c.png", "height": 12, "width": 16},
]


@pytest.fixture
def split(tmp_path):
    """Three images, a COCO json with one rectangle each."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    annotations = []
    for image in IMAGES:
        path = data / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        annotations.append(
            {
                "id": image["id"],
                "image_id": image["id"],
                "category_id": 1 + image["id"] % 2,
                "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]],
                "area": 48.0,
                "bbox": [2, 2, 8, 6],
                "iscrowd": 0,
            }
        )
    categories = [{"id": i, "name": n} for i, n in enumerate(CLASSES) if i > 0]
    json_file = data / "test.json"
    json_file.write_text(
        json.dumps({"images": IMAGES, "annotations": annotations, "categories": categories})
    )
    return data, json_file


def write_dump(folder, seed):
    """A dump of the three images with random confident probabilities."""
    rng = np.random.default_rng(seed)
    with ProbDumpWriter(str(folder), CLASSES) as writer:
        for image in IMAGES:
            probs = np.full((len(CLASSES), 12, 16), 0.02, np.float32)
            labels = rng.integers(0, len(CLASSES), (12, 16))
            np.put_along_axis(probs, labels[None], 0.96, axis=0)
            writer.add(image["file_name"], probs)
    return folder


def snapshot(folder):
    """Every file under ``folder`` (hidden ones included) -> its bytes."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def tool(name, *args):
    return [sys.executable, str(ROOT / "tools" / name), *map(str, args)]


def run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)


def ensemble_outputs(out):
    return [
        "--submission", out / "sub.csv", "--labels", out / "labels", "--probs", out / "probs",
        "--score", "--score-dir", out / "score",
    ]  # fmt: skip


def test_ensemble_failing_halfway_keeps_the_previous_outputs(split, tmp_path):
    data, json_file = split
    good = write_dump(tmp_path / "dump_a", seed=1)
    out = tmp_path / "out"
    proc = run(
        tool("ensemble.py", "--dumps", good, "--json", json_file, *ensemble_outputs(out)), tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = snapshot(out)
    assert {"sub.csv", "labels/img/a.png.png", "probs/index.json", "score/lb_metrics.json"} <= set(
        before
    )
    # other probabilities (other labels), the second image's array damaged: found halfway
    bad = write_dump(tmp_path / "dump_b", seed=2)
    (bad / "000001.npy").write_bytes(b"not an array")
    proc = run(
        tool("ensemble.py", "--dumps", bad, "--json", json_file, *ensemble_outputs(out)), tmp_path
    )
    assert proc.returncode != 0
    assert str(bad / "000001.npy") in proc.stderr
    assert snapshot(out) == before  # every output as the previous run left it, no temporary
    assert sorted(os.listdir(tmp_path)) == ["data", "dump_a", "dump_b", "out"]
    # no previous result: nothing
    fresh = tmp_path / "fresh"
    proc = run(
        tool("ensemble.py", "--dumps", bad, "--json", json_file, *ensemble_outputs(fresh)), tmp_path
    )
    assert proc.returncode != 0
    assert snapshot(fresh) in (None, {})


def test_ensemble_bad_image_names_the_file_and_writes_nothing(split, tmp_path):
    data, json_file = split
    good = write_dump(tmp_path / "dump_a", seed=1)
    image = data / IMAGES[1]["file_name"]
    image.write_bytes(image.read_bytes()[:60])  # truncated PNG, header intact
    out = tmp_path / "out"
    cmd = tool("ensemble.py", "--dumps", good, "--json", json_file, "--crf", "default")
    proc = run(cmd + ensemble_outputs(out)[:6], tmp_path)  # without the score
    assert proc.returncode != 0
    assert f"{image}: cannot decode the image" in proc.stderr
    assert snapshot(out) in (None, {})


def wait_for(folder, pattern, proc):
    """Wait until a file matching ``pattern`` exists under ``folder`` (``proc`` still running)."""
    for _ in range(6000):  # the tool imports torch and Detectron2 first
        if list(folder.glob(pattern)):
            return
        assert proc.poll() is None, (
            f"the tool exited before {pattern}: {proc.stderr.read()[-3000:]}"
        )
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} in {folder}")


def blocking_dump(folder, seed):
    """A dump whose second array is a FIFO: a reader blocks there, after the first image."""
    write_dump(folder, seed)
    os.remove(folder / "000001.npy")
    os.mkfifo(folder / "000001.npy")
    return folder


def test_ensemble_killed_keeps_the_previous_outputs_and_the_next_run_cleans_up(split, tmp_path):
    data, json_file = split
    good = write_dump(tmp_path / "dump_a", seed=1)
    out = tmp_path / "out"
    outputs = ["--submission", out / "sub.csv", "--labels", out / "labels"]
    assert (
        run(
            tool("ensemble.py", "--dumps", good, "--json", json_file, *outputs), tmp_path
        ).returncode
        == 0
    )
    before = snapshot(out)
    blocked = blocking_dump(tmp_path / "dump_b", seed=2)
    proc = subprocess.Popen(
        tool("ensemble.py", "--dumps", blocked, "--json", json_file, *outputs),
        cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(out, f".tmp_labels.{proc.pid}.*/img/a.png.png", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".")} == before
    assert any(name.startswith(".tmp_labels.") for name in os.listdir(out))  # the killed run's
    assert (
        run(
            tool("ensemble.py", "--dumps", good, "--json", json_file, *outputs), tmp_path
        ).returncode
        == 0
    )
    assert snapshot(out) == before  # same result again, the stale temporary removed


def test_pseudo_label_killed_leaves_nothing_and_the_next_run_cleans_up(split, tmp_path):
    data, json_file = split
    out = tmp_path / "pseudo"
    args = ["--json", json_file, "--image-root", data, "--output", out, "--threshold", "0.5"]
    blocked = blocking_dump(tmp_path / "dump_b", seed=2)
    proc = subprocess.Popen(
        tool("pseudo_label.py", "--dumps", blocked, *args),
        cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(tmp_path, f".tmp_pseudo.{proc.pid}.*/.tmp_labels.*/img/a.png.png", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp_pseudo.")]  # the killed run's
    good = write_dump(tmp_path / "dump_a", seed=1)
    proc = run(tool("pseudo_label.py", "--dumps", good, *args), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["data", "dump_a", "dump_b", "pseudo"]
    assert (out / "labels/img/a.png.png").is_file()


def test_only_stale_temporaries_of_the_same_output_are_removed(tmp_path):
    final = tmp_path / "labels"
    mine_alive = tmp_path / f".tmp_labels.{os.getpid()}.0123abcd"
    dead = tmp_path / f".tmp_labels.{dead_pid()}.0123abcd"
    dead_file = tmp_path / f".labels.{dead_pid()}.89abcdef.tmp"
    other_output = tmp_path / f".tmp_labels2.{dead_pid()}.0123abcd"
    unrelated = tmp_path / ".tmp_labels_backup"
    for folder in (mine_alive, dead, other_output, unrelated):
        folder.mkdir()
    dead_file.write_text("partial")
    removed = remove_stale_temporaries(str(final))
    assert sorted(removed) == sorted([str(dead), str(dead_file)])
    assert mine_alive.is_dir() and other_output.is_dir() and unrelated.is_dir()
    fresh = make_temporary_directory(str(final))
    assert os.path.basename(fresh).startswith(f".tmp_labels.{os.getpid()}.")


def test_output_names_keep_the_extension(split, tmp_path):
    data, json_file = split
    cv2.imwrite(str(data / "img/a.jpg"), np.zeros((12, 16, 3), np.uint8))
    images = IMAGES[:1] + [{"id": 9, "file_name": "img/a.jpg", "height": 12, "width": 16}]
    clash = data / "clash.json"
    content = json.loads(json_file.read_text())
    content["images"] = images
    content["annotations"] = [
        dict(a, image_id=9, id=9) for a in content["annotations"][:1]
    ] + content["annotations"][:1]
    clash.write_text(json.dumps(content))
    name = "partial_outputs_clash"
    register_coco_semseg(name, str(clash), str(data))
    try:
        sink = OverlaySink(str(tmp_path / "overlays"), name)
        labels = np.zeros((12, 16), np.uint8)
        for image in images:
            sink.add(image["file_name"], labels)
        written = sink.close()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert len(set(written)) == 2 and all(os.path.isfile(p) for p in written)
    assert sorted(snapshot(tmp_path / "overlays")) == ["img/a.jpg.png", "img/a.png.png"]
    pngs = LabelPngSink(str(tmp_path / "labels"))
    for image in images:
        pngs.add(image["file_name"], labels)
    assert pngs.close() == 2
    assert sorted(snapshot(tmp_path / "labels")) == ["img/a.jpg.png", "img/a.png.png"]
