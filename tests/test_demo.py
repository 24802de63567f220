"""``make demo`` end to end at a small size: data -> training -> val scores with and without
TTA -> submission (tools/demo.py in a subprocess, as the README runs it)."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["--iters", "6", "--num-train", "8", "--num-val", "3", "--num-test", "2"]
    result = subprocess.run(
        [sys.executable, "tools/demo.py", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("demo summary") :]

    scores = {}
    for name in ("val_score", "val_score_tta"):
        metrics = json.loads((out / name / "lb_metrics.json").read_text())["metrics"]
        assert 0.0 <= metrics["mIoU"] <= 1.0
        scores[name] = metrics["mIoU"]
    printed = re.search(r"val mIoU \(LB-style\)\s+: ([0-9.]+)", summary).group(1)
    printed_tta = re.search(r"val mIoU with TTA\s+: ([0-9.]+)", summary).group(1)
    assert printed == f"{scores['val_score']:.4f}"
    assert printed_tta == f"{scores['val_score_tta']:.4f}"
    # the submission is written with TTA exactly when TTA scored higher on val
    used = "with TTA" if scores["val_score_tta"] > scores["val_score"] else "without TTA"
    assert f"({used}, the better on val)" in summary

    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    test_images = json.loads((out / "data" / "test.json").read_text())["images"]
    assert rows[0] == ["image_id", "PredictionString"]
    assert [r[0] for r in rows[1:]] == [im["file_name"] for im in test_images]
    for _, labels in rows[1:]:
        values = labels.split()
        assert len(values) == 256 * 256 and {int(v) for v in values} <= set(range(11))
    assert len(list((out / "overlays").rglob("*.png"))) == 3
    assert (out / "val_score" / "confusion_matrix.png").is_file()
    assert (out / "model" / "model_final.pth").is_file()
