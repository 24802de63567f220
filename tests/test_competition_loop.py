"""The competition loop end to end on a tiny synthetic label-map dataset, every tool a
subprocess as a user chains them (mask2former.loop): two models trained by train_net.py,
probability dumps, soft vote + DenseCRF + agreement overwrite, pseudo-labels of the val images,
a retrain on train + pseudo-labels with FILTER_EMPTY_ANNOTATIONS True, then train_net.py
--eval-only with TEST.AUG.ENABLED True."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mask2former.loop import LoopSettings, Step, StepFailed, StepRunner, build_loop, run_loop
from mask2former.loop.competition import numbered_classes
from mask2former.loop.report import read_score
from mask2former.loop.steps import _Running, step_dependencies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["background", "square", "disc"]
SIZE = 64


def write_split(root, split, count, seed):
    """Grey noisy background (0) with a red square (1) and a blue disc (2) per image."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split, "images"))
    os.makedirs(os.path.join(root, split, "labels"))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(count):
        label = np.zeros((SIZE, SIZE), np.uint8)
        x, y, side = rng.integers(4, 24), rng.integers(4, 40), rng.integers(14, 22)
        label[y : y + side, x : x + side] = 1
        cx, cy, r = rng.integers(44, 56), rng.integers(12, 52), rng.integers(7, 11)
        label[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 2
        colors = np.array([[128, 128, 128], [220, 30, 30], [30, 30, 220]], np.float64)
        image = colors[label] + rng.normal(0, 12, (SIZE, SIZE, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, split, "images", f"{i:03d}.jpg"))
        Image.fromarray(label).save(os.path.join(root, split, "labels", f"{i:03d}.png"))


def tiny_settings(data, output, **overrides):
    kwargs = dict(
        data_root=str(data),
        output=str(output),
        class_names=CLASSES,
        background_label=0,
        config_a="configs/tiny/m2f_swin_tiny_cpu.yaml",
        config_b="configs/tiny/semask_swin_tiny_cpu.yaml",
        budget_iters=60,
        ablation_iters=10,
        min_size_test=SIZE,
        crop=SIZE,
        jitter_scales=(0.875, 1.0, 1.125),
        steps=("convert", "models", "ensemble", "pseudo"),
        tta=False,
        crf_presets=("default",),
        all_ensemble_rows=False,
        pseudo_ignore_in_mask=(True,),
        ensemble_workers=1,
        extra_opts=["INPUT.SIZE_DIVISIBILITY", str(SIZE), "DATALOADER.NUM_WORKERS", "0"],
        repo_root=REPO,
    )
    kwargs.update(overrides)
    return LoopSettings(**kwargs)


def all_background_miou(label_dir):
    """mIoU of predicting background everywhere: IoU(background) = its pixel share, other
    classes 0, averaged over the classes present."""
    labels = np.stack(
        [np.array(Image.open(os.path.join(label_dir, f))) for f in sorted(os.listdir(label_dir))]
    )
    present = [c for c in range(len(CLASSES)) if (labels == c).any()]
    return float((labels == 0).mean()) / len(present)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_split(data, "train", 24, seed=0)
    write_split(data, "val", 6, seed=1)
    output = tmp_path_factory.mktemp("loop")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = tiny_settings(data, output, jobs=2)  # independent steps side by side
    document = run_loop(settings, command="test")
    return settings, document


def test_loop_learns_and_writes_table(loop):
    settings, document = loop
    rows = {row["name"]: row for row in document["rows"]}
    assert set(rows) == {
        "A",
        "B",
        "A+B crf default agreement",
        "A pseudo ignore mask on",
    }
    baseline = all_background_miou(os.path.join(settings.data_root, "val", "labels"))
    for name, row in rows.items():
        assert row["mIoU"] > baseline + 0.2, (name, row["mIoU"], baseline)
    assert rows["B"]["delta"] == pytest.approx(rows["B"]["mIoU"] - rows["A"]["mIoU"])
    with open(os.path.join(settings.output, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["rows"] == document["rows"]
    with open(os.path.join(settings.output, "results.md"), encoding="utf-8") as f:
        table = f.read()
    assert "| models | A |" in table and "A pseudo ignore mask on" in table
    # every step has a wall time
    steps, _ = build_loop(settings)
    assert set(document["wall_s"]) == {s.name for s in steps}


def test_pseudo_labels_cover_val_and_retrain_used_them(loop):
    settings, _ = loop
    with open(os.path.join(settings.output, "pseudo", "val", "pseudo.json")) as f:
        pseudo = json.load(f)
    assert len(pseudo["images"]) == 6
    log = os.path.join(settings.output, "logs", "train_A_pseudo_ignore_mask_on.log")
    with open(log, encoding="utf-8") as f:
        text = f.read()
    assert "loop_val_pseudo" in text and "FILTER_EMPTY_ANNOTATIONS" in text


def test_rerun_reuses_every_step(loop, caplog):
    settings, document = loop
    caplog.set_level("INFO", logger="mask2former.loop.steps")
    again = run_loop(settings, command="test")
    assert again["rows"] == document["rows"]
    assert "running" not in caplog.text and "complete, reused" in caplog.text


def test_eval_only_with_tta(loop, tmp_path):
    """train_net.py --eval-only with TEST.AUG.ENABLED True scores the retrained model with
    multi-scale + flip."""
    settings, document = loop
    steps, _ = build_loop(settings)
    train = next(s for s in steps if s.name == "train_A_pseudo_ignore_mask_on")
    weights = train.artefacts[0]
    command = [a for a in train.command if a != "--resume"]
    command[0] = sys.executable
    command.insert(2, "--eval-only")  # train_net.py --eval-only --config-file ... KEY VALUE
    out = str(tmp_path / "eval_tta")
    command += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", out]
    command += ["DATASETS.TEST", "('loop_val',)", "TEST.AUG.ENABLED", "True"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    tta = read_score(os.path.join(out, "inference_TTA", "loop_val", "lb_metrics.json"))
    baseline = all_background_miou(os.path.join(settings.data_root, "val", "labels"))
    assert tta["mIoU"] > baseline + 0.2
    # multi-scale + flip changes the predictions: not the single-scale score of the same model
    single = next(r for r in document["rows"] if r["name"] == "A pseudo ignore mask on")
    assert tta["mIoU"] != single["mIoU"]


def test_numbered_classes_and_layout_errors(tmp_path):
    write_split(tmp_path, "train", 2, seed=0)
    write_split(tmp_path, "val", 1, seed=1)
    assert numbered_classes(str(tmp_path), 255) == ["0", "1", "2"]
    assert numbered_classes(str(tmp_path), 2) == ["0", "1"]
    with pytest.raises(FileNotFoundError, match="needs train/ and val/"):
        tiny_settings(tmp_path / "missing", tmp_path / "out")


def test_step_runner_reruns_only_incomplete_steps_and_names_the_log(tmp_path):
    done, partial = tmp_path / "done.txt", tmp_path / "partial"
    write = (
        "import os, sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True); "
        "open(sys.argv[1], 'w').write('x')"
    )
    steps = [
        Step("first", ["python", "-c", write, str(done)], [str(done)]),
        Step("second", ["python", "-c", write, str(partial / "final")], [str(partial / "final")],
             outputs=[str(partial)]),
    ]  # fmt: skip
    partial.mkdir()
    (partial / "stale").write_text("left by a killed run")
    done.write_text("complete")
    wall = StepRunner(str(tmp_path), cwd=str(tmp_path)).run(steps)
    assert done.read_text() == "complete"  # reused, not rerun
    assert sorted(os.listdir(partial)) == ["final"]  # the stale output was removed first
    assert wall["first"] is None and wall["second"] >= 0
    failing = Step("failing", ["python", "-c", "raise SystemExit('boom')"], [str(tmp_path / "x")])
    with pytest.raises(StepFailed, match=r"(?s)failed \(exit 1\).*failing\.log.*boom"):
        StepRunner(str(tmp_path), cwd=str(tmp_path)).run([failing])


def test_loop_steps_wait_only_for_what_they_read(loop):
    settings, _ = loop
    steps, _ = build_loop(settings)
    needs = step_dependencies(steps)
    assert needs["convert_train"] == [] and needs["convert_val"] == []
    # both trainings read both converted splits (the registered datasets), not each other
    assert set(needs["train_A"]) == set(needs["train_B"]) == {"convert_train", "convert_val"}
    assert "train_A" in needs["predict_A"] and "train_B" not in needs["predict_A"]
    ensemble = next(name for name in needs if name.startswith("ensemble_"))
    assert {"predict_A", "predict_B"} <= set(needs[ensemble])
    assert {"predict_A", "predict_B"} <= set(needs["pseudo_val"])
    assert "pseudo_val" in needs["train_A_pseudo_ignore_mask_on"]
    assert "train_A" not in needs["train_A_pseudo_ignore_mask_on"]


def _step(path, signal=None, wait_for=None, sleep=0.0, fail=False):
    """A step command: write ``signal`` (if given), wait (up to 60 s) until ``wait_for``
    exists, sleep ``sleep`` s, then write ``path`` (or fail)."""
    code = (
        "import os, sys, time\n"
        "path, signal, wait_for, sleep = sys.argv[1:5]\n"
        "if signal: open(signal, 'w').write('x')\n"
        "deadline = time.monotonic() + 60\n"
        "while wait_for and not os.path.exists(wait_for):\n"
        "    assert time.monotonic() < deadline, 'the other step never started'\n"
        "    time.sleep(0.05)\n"
        "time.sleep(float(sleep))\n"
        + ("raise SystemExit('boom')\n" if fail else "open(path, 'w').write('x')\n")
    )
    return ["python", "-c", code, str(path), str(signal or ""), str(wait_for or ""), str(sleep)]


def test_independent_steps_run_side_by_side(tmp_path):
    """Each of two independent steps signals that it runs, then waits for the other's signal:
    both complete only when they run at once. A third step reads both results: it starts
    after them."""
    a_runs, b_runs = tmp_path / "a_runs", tmp_path / "b_runs"
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    steps = [
        Step("a", _step(a, signal=a_runs, wait_for=b_runs), [str(a)]),
        Step("b", _step(b, signal=b_runs, wait_for=a_runs), [str(b)]),
        Step("both", _step(both) + [str(a), str(b)], [str(both)]),
    ]
    needs = step_dependencies(steps)
    assert needs == {"a": [], "b": [], "both": ["a", "b"]}
    wall = StepRunner(str(tmp_path), cwd=str(tmp_path), jobs=2).run(steps)
    assert all(path.exists() for path in (a, b, both))
    assert set(wall) == {"a", "b", "both"} and all(t >= 0 for t in wall.values())
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        StepRunner(str(tmp_path), cwd=str(tmp_path), jobs=0)


def test_failed_step_stops_new_steps_and_waits_for_running_ones(tmp_path, caplog):
    """A failure is logged at once; the step running beside it is waited for and its result
    kept; a step that reads the failed step's result never starts."""
    slow_runs, slow, never, x = (tmp_path / n for n in ("slow_runs", "slow", "never", "x"))
    steps = [
        Step("slow", _step(slow, signal=slow_runs, sleep=1.0), [str(slow)]),
        Step("failing", _step(x, wait_for=slow_runs, fail=True), [str(x)]),
        Step("after", _step(never) + [str(x)], [str(never)]),
    ]
    caplog.set_level("INFO", logger="mask2former.loop.steps")
    runner = StepRunner(str(tmp_path), cwd=str(tmp_path), jobs=2)
    with pytest.raises(StepFailed, match=r"(?s)'failing' failed \(exit 1\).*boom"):
        runner.run(steps)
    assert slow.exists() and not never.exists()
    assert "slow" in runner.wall_times and "failing" not in runner.wall_times
    assert "waiting for the running steps" in caplog.text
    assert "after: running" not in caplog.text


def test_eta_counts_pending_and_unfinished_running_steps(tmp_path):
    """At 2 s per unit of cost: pending steps of cost 10 + 20 take 60 s; a running step of cost
    10 started 5 s ago has 15 s left; with 2 jobs that is (60 + 15) / 2 s."""
    pending = [Step("p1", ["x"], [], cost=10), Step("p2", ["x"], [], cost=20)]
    running = [_Running(Step("r", ["x"], [], cost=10), None, None, "", time.monotonic() - 5)]
    eta = StepRunner(str(tmp_path), cwd=str(tmp_path), jobs=2)._eta(2.0, pending, running)
    assert eta == pytest.approx(37.5, abs=0.5)
    assert StepRunner(str(tmp_path), cwd=str(tmp_path))._eta(2.0, pending, []) == 60.0
