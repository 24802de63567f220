"""SafeCheckpointer in process: weights files that could run code are refused (and run nothing),
official-style .pkl files of NumPy arrays load, the opt-in reads trusted legacy files, broken
files get errors naming them, saves are atomic, resuming skips unreadable checkpoints, and loads
report what did not fit the model."""

import argparse
import collections
import contextlib
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from processes import dead_pid
from torch import nn

from mask2former.engine.checkpoint import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    SafeCheckpointer,
    UnsafeCheckpointError,
    read_checkpoint,
)
from mask2former.utils.io import atomic_write

TORCH_ADVICE = "weights_only=False will likely succeed"


class TinyNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.class_embed = nn.Linear(8, num_classes + 1)


class Counter:
    """A checkpointable standing in for the trainer (its iteration)."""

    def __init__(self, iteration=-1, max_iter=None):
        self.iteration = iteration
        self.max_iter = max_iter

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@contextlib.contextmanager
def captured_warnings():
    """WARNING records of the checkpoint loggers (independent of other tests' logger setup)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    names = ("fvcore.common.checkpoint", "mask2former.engine.checkpoint")
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def numpy_state(model, seed=0):
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        (k, rng.standard_normal(v.shape).astype(np.float32)) for k, v in model.state_dict().items()
    )


# ------------------------------------------------------------------------------ code in a file
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pkl_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": numpy_state(TinyNet()), "__author__": "x", "x": RunsCode(marker)},
            f,
            protocol=protocol,
        )
    with pytest.raises(UnsafeCheckpointError) as e:
        SafeCheckpointer(TinyNet()).load(str(path))
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert "MODEL.WEIGHTS_ALLOW_CODE_EXECUTION" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pth_is_refused_and_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": TinyNet().state_dict(), "x": RunsCode(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError) as e:
        SafeCheckpointer(TinyNet()).load(str(path))
    assert str(path) in str(e.value) and "system" in str(e.value)
    assert TORCH_ADVICE not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_official_style_pkl_loads(tmp_path, protocol):
    model = TinyNet()
    state = numpy_state(model)
    path = tmp_path / "model_final_official.pkl"
    data = {
        "model": state,
        "__author__": "FAIR",
        "matching_heuristics": False,
        "extra": [np.float32(1.5), np.int64(3), b"bytes", ("a", None, True)],
    }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    checkpointer = SafeCheckpointer(model)
    rest = checkpointer.load(str(path))
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), state[k]), k
    assert rest["extra"][0] == np.float32(1.5) and rest["extra"][2] == b"bytes"
    assert rest["extra"][3] == ("a", None, True)
    assert checkpointer.load_report.num_loaded == len(state)


def test_torch_file_named_pkl_loads(tmp_path):
    model = TinyNet()
    path = tmp_path / "weights.pkl"
    torch.save({"model": {k: torch.ones_like(v) for k, v in model.state_dict().items()}}, path)
    SafeCheckpointer(model).load_for_inference(str(path))
    assert all(bool((v == 1).all()) for v in model.state_dict().values())


def test_torch_objects_in_pkl_are_refused_with_advice(tmp_path):
    legacy = tmp_path / "legacy_torch_save.pkl"
    torch.save({"model": TinyNet().state_dict()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpointError, match="legacy format, not a pickle: rename it"):
        SafeCheckpointer(TinyNet()).load(str(legacy))
    pickled = tmp_path / "pickled_tensors.pkl"
    pickled.write_bytes(pickle.dumps({"model": TinyNet().state_dict()}))
    with pytest.raises(UnsafeCheckpointError, match="save PyTorch tensors with torch.save"):
        SafeCheckpointer(TinyNet()).load(str(pickled))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_opt_in_reads_trusted_legacy_file(tmp_path, suffix):
    path = tmp_path / f"legacy{suffix}"
    state = numpy_state(TinyNet())
    data = {"model": state, "__author__": "old", "args": argparse.Namespace(lr=0.1)}
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        data["model"] = {k: torch.from_numpy(v) for k, v in state.items()}
        torch.save(data, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        SafeCheckpointer(TinyNet()).load(str(path))
    model = TinyNet()
    rest = SafeCheckpointer(model, allow_code_execution=True).load(str(path))
    assert rest["args"].lr == 0.1
    assert np.array_equal(model.backbone.weight.detach().numpy(), state["backbone.weight"])


# ------------------------------------------------------------------------------ broken files
def _zip_pth(path):
    torch.save({"model": TinyNet().state_dict()}, path)


def _legacy_pth(path):
    torch.save({"model": TinyNet().state_dict()}, path, _use_new_zipfile_serialization=False)


def _pkl(path):
    with open(path, "wb") as f:
        pickle.dump({"model": numpy_state(TinyNet()), "__author__": "FAIR"}, f)


def _truncate(make):
    def write(path):
        make(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 5])

    return write


BROKEN = {
    "empty.pth": lambda p: p.write_bytes(b""),
    "empty.pkl": lambda p: p.write_bytes(b""),
    "truncated_zip.pth": _truncate(_zip_pth),
    "truncated_legacy.pth": _truncate(_legacy_pth),
    "truncated.pkl": _truncate(_pkl),
    "random.pth": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "random.pkl": lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)),
    "tensor.pth": lambda p: torch.save(torch.zeros(3), p),
    "list.pkl": lambda p: p.write_bytes(pickle.dumps([1, 2, 3])),
    "strings.pth": lambda p: torch.save({"model": {"backbone.weight": "not a tensor"}}, p),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_error_names_the_file(tmp_path, name):
    path = tmp_path / name
    BROKEN[name](path)
    with pytest.raises(CorruptCheckpointError) as e:
        SafeCheckpointer(TinyNet()).load(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert TORCH_ADVICE not in message
    if name.startswith("empty"):
        assert "empty (0 bytes)" in message
    elif name.startswith(("truncated", "random")):
        assert f"({path.stat().st_size} bytes;" in message and "truncated or corrupt" in message
    else:
        assert "not a" in message


# ------------------------------------------------------------------------------ saving
def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "model_final.pth"
    target.write_bytes(b"previous")

    with pytest.raises(KeyboardInterrupt), atomic_write(str(target)) as f:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["model_final.pth"]


def test_save_writes_loadable_files_and_removes_stale_temporaries(tmp_path):
    stale = tmp_path / f".model_0000001.pth.{dead_pid()}.0badf00d.tmp"
    stale.write_bytes(b"left by a killed run")
    # a save in progress in a live process (here: this one) is left alone
    in_progress = tmp_path / f".model_0000002.pth.{os.getpid()}.0badf00d.tmp"
    in_progress.write_bytes(b"being written")
    checkpointer = SafeCheckpointer(TinyNet(), str(tmp_path), trainer=Counter(1))
    checkpointer.save("model_0000001")
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == [
        in_progress.name,
        "last_checkpoint",
        "model_0000001.pth",
    ]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert read_checkpoint(str(tmp_path / "model_0000001.pth"))["trainer"] == {"iteration": 1}


# ------------------------------------------------------------------------------ resuming
def _run(tmp_path, iterations, final=True):
    counter = Counter()
    checkpointer = SafeCheckpointer(TinyNet(), str(tmp_path), trainer=counter)
    for it in iterations:
        counter.iteration = it
        checkpointer.save(f"model_{it:07d}", iteration=it)
    if final:
        checkpointer.save("model_final", iteration=counter.iteration)


def _resume(tmp_path, max_iter=None):
    counter = Counter(max_iter=max_iter)
    checkpointer = SafeCheckpointer(TinyNet(), str(tmp_path), trainer=counter)
    with captured_warnings() as warnings:
        checkpointer.resume_or_load("", resume=True)
    return counter.iteration, checkpointer.has_checkpoint(), [w.getMessage() for w in warnings]


def test_resume_skips_a_truncated_final_checkpoint(tmp_path):
    _run(tmp_path, [1, 2])  # model_final holds iteration 2 too
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    # a newer-looking partial file must never be used
    torch.save(
        {"model": TinyNet().state_dict(), "trainer": {"iteration": 99}},
        tmp_path / f".model_0000099.pth.{dead_pid()}.12345678.tmp",
    )
    iteration, has_checkpoint, warnings = _resume(tmp_path)
    assert (iteration, has_checkpoint) == (2, True)
    assert len(warnings) == 1
    assert str(tmp_path / "model_0000002.pth") in warnings[0] and str(final) in warnings[0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_rewrites_the_final_checkpoint_of_a_finished_run(tmp_path):
    _run(tmp_path, [1, 2])  # a finished run of 3 iterations (0, 1, 2)
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    iteration, has_checkpoint, warnings = _resume(tmp_path, max_iter=3)
    assert (iteration, has_checkpoint) == (2, True)
    assert read_checkpoint(str(final))["trainer"] == {"iteration": 2}
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert any("Rewriting model_final.pth" in w for w in warnings)


def test_resume_with_no_loadable_checkpoint_starts_from_scratch(tmp_path):
    _run(tmp_path, [], final=True)
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])
    iteration, has_checkpoint, warnings = _resume(tmp_path)
    assert (iteration, has_checkpoint) == (-1, False)
    assert any("starts from MODEL.WEIGHTS at iteration 0" in w for w in warnings)


def test_resume_when_last_checkpoint_names_a_missing_file(tmp_path):
    _run(tmp_path, [1, 2], final=False)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    iteration, has_checkpoint, warnings = _resume(tmp_path)
    assert (iteration, has_checkpoint) == (2, True)
    assert "model_0000003.pth" in warnings[0]


def test_resume_refuses_an_unsafe_last_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    torch.save(
        {"model": TinyNet().state_dict(), "x": RunsCode(marker)}, tmp_path / "model_final.pth"
    )
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointer(TinyNet(), str(tmp_path)).resume_or_load("", resume=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------ load reports
def _mismatched_file(tmp_path):
    """A file for TinyNet(num_classes=10): another head shape, one tensor missing, one extra."""
    state = TinyNet(num_classes=10).state_dict()
    del state["backbone.bias"]
    state["old_head.weight"] = torch.zeros(2)
    path = tmp_path / "other_head.pth"
    torch.save({"model": state}, path)
    return path


def test_inference_load_refuses_weights_that_do_not_fit(tmp_path):
    path = _mismatched_file(tmp_path)
    with pytest.raises(IncompleteCheckpointError) as e:
        SafeCheckpointer(TinyNet()).load_for_inference(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert "1 of 4 model tensors loaded" in message
    assert "1 missing from the file (backbone.bias)" in message
    assert "class_embed.weight (11, 8) in the file vs (6, 8) in the model" in message


def test_inference_load_accepts_complete_weights_and_requires_some(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"model": TinyNet().state_dict()}, path)
    SafeCheckpointer(TinyNet()).load_for_inference(str(path))
    with pytest.raises(ValueError, match="no weights"):
        SafeCheckpointer(TinyNet()).load_for_inference("")


def test_training_load_gives_one_summary_warning_with_counts(tmp_path):
    path = _mismatched_file(tmp_path)
    checkpointer = SafeCheckpointer(TinyNet())
    with captured_warnings() as warnings:
        checkpointer.resume_or_load(str(path), resume=False)
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(path) in message and "1 of 4 model tensors loaded" in message
    assert "1 missing" in message and "2 with another shape" in message
    assert "1 unexpected in the file (old_head.weight)" in message
