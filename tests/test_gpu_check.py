"""benchmarks/gpu_check.py: the skip without CUDA, and its checks run on CPU with tiny sizes
(the GPU-only parts, compiled flex attention and NATTEN, run only on a GPU)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_skips_with_a_clear_message_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu_check: skipped: CUDA is not available" in proc.stdout
    assert not out.exists()


def test_unknown_check_is_rejected():
    with pytest.raises(SystemExit):
        gpu_check.main(["--skip", "train,speed"])


@pytest.mark.parametrize("config", ["m2f_swin_tiny_cpu.yaml", "semask_swin_tiny_cpu.yaml"])
def test_training_steps_on_cpu(config):
    row = gpu_check.train_steps("tiny/" + config, "fp32", "cpu", steps=1, size=64)
    assert row["ok"] is True and row["check"] == "train"
    assert len(row["losses"]) == 2 and all(math.isfinite(v) and v > 0 for v in row["losses"])
    assert row["steps_skipped_by_loss_scaler"] == 0 and row["non_finite_gradient_steps"] == 0
    assert row["images_per_s"] > 0 and row["peak_memory_gib"] is None


def test_sync_check_runs_a_training_step_on_cpu_and_counts_sync_warnings(monkeypatch):
    row = gpu_check.sync_count("tiny/m2f_swin_tiny_cpu.yaml", "cpu", size=64)
    assert row == {
        "check": "syncs",
        "case": "tiny/m2f_swin_tiny_cpu.yaml",
        "ok": True,
        "syncs_per_step": 0,  # only CUDA reports synchronisations
        "top_places": "",
    }

    class SyncingLoop:
        """Warns as CUDA's sync debug mode does, twice in the timed step only."""

        def run_step(self):
            for _ in range(2 if self.iter == 1 else 5):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    monkeypatch.setattr(gpu_check, "build_step_trainer", lambda *args: SyncingLoop())
    row = gpu_check.sync_count("tiny/m2f_swin_tiny_cpu.yaml", "cpu", size=64)
    assert row["syncs_per_step"] == 2 and row["top_places"].endswith("x2")
    monkeypatch.setattr(gpu_check, "MAX_SYNCS_PER_STEP", 2)
    assert gpu_check.sync_count("tiny/m2f_swin_tiny_cpu.yaml", "cpu", size=64)["ok"] is False


def test_synthetic_batch_masks_match_the_label_map():
    batch = gpu_check.synthetic_batch(2, 32, 11, seed=1)
    for item in batch:
        inst = item["instances"]
        assert inst.gt_masks.shape == (len(inst.gt_classes), 32, 32)
        rebuilt = (inst.gt_masks.long() * inst.gt_classes[:, None, None]).sum(0)
        assert torch.equal(rebuilt, item["sem_seg"])
        assert inst.gt_masks.sum(0).eq(1).all()  # the masks partition the image


def test_deformable_check_compares_the_two_implementations_on_cpu():
    row = gpu_check.deformable_attention(
        "cpu", d_model=32, heads=4, points=2, shapes=((8, 8), (4, 4)), runs=2
    )
    assert row["ok"] is True
    assert row["forward_max_abs_diff"] <= 1e-4 and row["backward_max_abs_diff"] <= 1e-4
    assert row["case"] == "fast vs pytorch"
    assert row["fast_fwd_bwd_ms"] > 0 and row["pytorch_fwd_bwd_ms"] > 0
    ratio = row["pytorch_fwd_bwd_ms"] / row["fast_fwd_bwd_ms"]
    assert row["speedup_vs_pytorch"] == pytest.approx(ratio)


def test_failing_check_is_reported_and_table_and_json_are_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gpu_check, "deformable_attention", broken)
    rows = gpu_check.run_checks("cpu", checks=("deformable",))
    assert rows == [
        {
            "check": "deformable",
            "case": "fast vs pytorch",
            "ok": False,
            "error": "RuntimeError: CUDA out of memory",
        },
        {
            "check": "deformable",
            "case": "triton vs pytorch",
            "ok": None,
            "skipped": "Triton cannot run on cpu",
        },
    ]
    rows.append({"check": "inference", "case": "Swin-T", "ok": True, "images_per_s": 12.5})
    rows.append({"check": "attention", "case": "natten", "ok": None, "skipped": "no natten"})
    table = gpu_check.format_table(rows).splitlines()
    assert table[0] == "| check | case | result | figures |" and len(table) == 2 + len(rows)
    assert (
        "| deformable | fast vs pytorch | FAIL | error=RuntimeError: CUDA out of memory |" in table
    )
    assert "| inference | Swin-T | ok | images_per_s=12.5 |" in table
    assert "| attention | natten | skipped | skipped=no natten |" in table
    path = tmp_path / "sub" / "gpu_check.json"
    gpu_check.write_json_atomic(path, {"results": rows})
    assert json.loads(path.read_text()) == {"results": rows}
    assert [p.name for p in path.parent.iterdir()] == ["gpu_check.json"]  # no temporary left
