"""Checkpoint loading and saving for this project.

Loading never runs code from a file unless asked to: ``.pkl`` files (the format of the official
Detectron2 / Mask2Former releases) are read by an unpickler that builds only plain data and NumPy
arrays, every other file by ``torch.load(..., weights_only=True)``. A file that needs anything
else is refused with an error naming it and saying how to convert it; a truncated, empty or
garbage file gets an error naming it too. ``allow_code_execution=True`` (config key
``MODEL.WEIGHTS_ALLOW_CODE_EXECUTION``) reads trusted legacy files with plain pickle.

Saving writes every checkpoint and ``last_checkpoint`` through
:func:`mask2former.utils.io.atomic_write` (a hidden temporary file in the same folder, fsynced and
renamed over the target), so that a killed run leaves the previous complete file (or none), never
a partial one; the temporaries of killed runs are removed before the next save or resume. Their
names are hidden and do not end in ".pth", so nothing that lists checkpoints ever sees them.
Resuming checks that the checkpoint named by ``last_checkpoint`` loads and otherwise falls back to
the newest checkpoint of the folder that does.
"""

import collections
import logging
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_write, remove_stale_temporary_files

__all__ = [
    "CheckpointFileError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "LoadReport",
    "SafeCheckpointer",
    "UnsafeCheckpointError",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
# Checkpoints written by the trainer's periodic checkpointer (the only ones resuming falls back to).
_TRAINER_CHECKPOINT = re.compile(r"model_(\d+|final)\.pth")

# First pickle of a legacy-format (non-zip) torch.save file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_ALLOW_HINT = (
    "Only if you trust the file, set MODEL.WEIGHTS_ALLOW_CODE_EXECUTION True to read it with "
    "plain pickle (which runs whatever code it contains)."
)


class CheckpointFileError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path


class UnsafeCheckpointError(CheckpointFileError):
    """The file holds Python objects whose unpickling could run code."""


class CorruptCheckpointError(CheckpointFileError):
    """The file is empty, truncated, garbage, or not a checkpoint dictionary."""


class IncompleteCheckpointError(CheckpointFileError):
    """Model tensors were not loaded from the file (missing or of another shape)."""


# ---------------------------------------------------------------------------------------- reading
def _numpy_core():
    try:
        from numpy._core import multiarray, numeric  # NumPy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _latin1_encode(text, encoding="latin1"):
    """What protocol-2 pickles call to rebuild ``bytes``: str -> bytes in Latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"unexpected byte-string encoding {encoding!r}")
    return text.encode("latin1")


def _data_globals():
    multiarray, numeric = _numpy_core()
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Array and scalar constructors (protocol 5 arrays are built from a byte buffer), under the
    # module names of NumPy < 2 and of NumPy >= 2.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """Unpickler that builds dicts, lists, tuples, strings, bytes, numbers, booleans, None and
    NumPy arrays / scalars / dtypes, and refuses every other class or function."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _data_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            if module.split(".")[0] == "torch":
                raise UnsafeCheckpointError(
                    self._path,
                    f"refusing to unpickle it: it refers to {module}.{name}, but a .pkl "
                    "checkpoint holds NumPy arrays; save PyTorch tensors with torch.save as a "
                    ".pth file (read with torch.load(weights_only=True)). " + _ALLOW_HINT,
                ) from None
            raise UnsafeCheckpointError(
                self._path,
                f"refusing to unpickle it: it refers to {module}.{name}, and unpickling such a "
                "reference can run arbitrary code. Detectron2 / Mask2Former .pkl checkpoints hold "
                "only dicts, lists, strings, numbers and NumPy arrays. If the file holds weights, "
                "convert it in a Python session you trust: load it with pickle and save "
                '{"model": {name: numpy array}} with pickle (.pkl) or '
                '{"model": {name: tensor}} with torch.save (.pth). ' + _ALLOW_HINT,
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not data")


def _reason(exc):
    """The specific part of a load error (torch wraps it in advice that does not apply here)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text.split(". This is an internal miniz error", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unreadable(path, size, exc):
    return CorruptCheckpointError(
        path,
        f"cannot read this checkpoint ({size} bytes; {_reason(exc)}). The file is truncated or "
        "corrupt (for example cut off by a run killed while saving, or an incomplete copy), or "
        "it is not a checkpoint. Use an earlier checkpoint or copy the file again.",
    )


def _is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _read_pickle(path, size, allow_code_execution):
    try:
        with open(path, "rb") as f:
            if allow_code_execution:
                return pickle.load(f, encoding="latin1")
            return _DataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # any failure of the unpickler on bad bytes
        raise _unreadable(path, size, e) from e


def _read_torch(path, size, allow_code_execution):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_code_execution)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))
        if blocked is None:
            raise _unreadable(path, size, e) from e
        raise UnsafeCheckpointError(
            path,
            f"refusing to load it: it holds a Python object ({blocked.group(1)}) that "
            "torch.load(weights_only=True) does not build, because unpickling it can run "
            "arbitrary code. If the file holds weights, convert it in a Python session you "
            'trust: ckpt = torch.load(path, weights_only=False); torch.save({"model": '
            'ckpt["model"]}, new_path). ' + _ALLOW_HINT,
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on bad bytes
        raise _unreadable(path, size, e) from e


def _check_model_state(path, checkpoint):
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(
            path,
            f"holds a {type(checkpoint).__name__}, not a checkpoint dictionary "
            '({"model": {parameter name: tensor or array}, ...})',
        )
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            path, f'"model" holds a {type(state).__name__}, not a dictionary of weights'
        )
    for key, value in state.items():
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise CorruptCheckpointError(
                path, f'"model" entry {key!r} is a {type(value).__name__}, not a tensor or array'
            )


def read_checkpoint(path, *, allow_code_execution=False):
    """Read a weights file into Detectron2's checkpoint dictionary ``{"model": state, ...}``.

    ``.pkl``: official Detectron2 / Mask2Former format (``{"model": ..., "__author__": ...}``) or
    a Caffe2-style dict of arrays (returned with ``matching_heuristics``, as Detectron2 does);
    ``.pyth``: pycls (``model_state``); anything else: ``torch.save`` output, either a checkpoint
    dict with ``"model"`` or a bare state dict.

    Args:
        path (str): local file.
        allow_code_execution (bool): read with plain pickle / ``weights_only=False``, which runs
            any code the file contains (trusted legacy files only).

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError: naming ``path``.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptCheckpointError(
            path, "the file is empty (0 bytes), e.g. left by a run killed while saving it"
        )
    if allow_code_execution:
        logger.warning(
            "Reading %s with code execution allowed (MODEL.WEIGHTS_ALLOW_CODE_"
            "EXECUTION): only do this for files you trust",
            path,
        )
    # torch.save output renamed to .pkl is still read by torch.load.
    if path.endswith(".pkl") and not _is_zip(path):
        data = _read_pickle(path, size, allow_code_execution)
        if data == _TORCH_LEGACY_MAGIC:
            raise CorruptCheckpointError(
                path, "is a torch.save file of the legacy format, not a pickle: rename it to .pth"
            )
        if isinstance(data, dict) and not ("model" in data and "__author__" in data):
            # Caffe2 / Detectron1 model zoo: arrays at the top level or under "blobs".
            blobs = data.get("blobs", data)
            if isinstance(blobs, dict):
                blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
            data = {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
    else:
        data = _read_torch(path, size, allow_code_execution)
        if path.endswith(".pyth") and isinstance(data, dict) and "model_state" in data:
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            data = {"model": state, "__author__": "pycls", "matching_heuristics": True}
        elif isinstance(data, dict) and "model" not in data:
            data = {"model": data}
    _check_model_state(path, data)
    return data


# ---------------------------------------------------------------------------------------- reports
@dataclass
class LoadReport:
    """How the tensors of one file fitted the model."""

    path: str
    num_model_tensors: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # (name, shape in the file, shape in the model)
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def num_loaded(self):
        return self.num_model_tensors - len(self.missing) - len(self.wrong_shape)

    def summary(self, first=3, name_file=True):
        def names(keys):
            shown = ", ".join(keys[:first])
            return f" ({shown}{', ...' if len(keys) > first else ''})" if keys else ""

        shapes = [
            f"{k} {tuple(a)} in the file vs {tuple(b)} in the model" for k, a, b in self.wrong_shape
        ]
        source = f" from {self.path}" if name_file else ""
        return (
            f"{self.num_loaded} of {self.num_model_tensors} model tensors loaded{source}; "
            f"{len(self.missing)} missing from the file{names(self.missing)}, "
            f"{len(self.wrong_shape)} with another shape{names(shapes)}, "
            f"{len(self.unexpected)} unexpected in the file{names(self.unexpected)}"
        )

    def require_complete(self):
        """Raise :class:`IncompleteCheckpointError` unless every model tensor was loaded."""
        if self.missing or self.wrong_shape:
            raise IncompleteCheckpointError(
                self.path,
                "does not fit the model: "
                + self.summary(first=5, name_file=False)
                + ". The model tensors that were not loaded would keep random values, so "
                "evaluation / prediction is refused. "
                "Use the config the checkpoint was trained with (MODEL.SEM_SEG_HEAD.NUM_CLASSES, "
                "backbone and head sizes).",
            )


# -------------------------------------------------------------------------------- checkpointer
class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads only data, writes checkpoints atomically, resumes from
    the newest checkpoint that loads, and reports how a file fitted the model.

    Args:
        model, save_dir, save_to_disk, checkpointables: as for :class:`DetectionCheckpointer`.
        allow_code_execution (bool): read weights files with plain pickle (runs any code they
            contain; trusted legacy files only). ``cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION``.

    Attributes:
        load_report (LoadReport or None): of the last file loaded into the model.
    """

    def __init__(
        self,
        model,
        save_dir="",
        *,
        save_to_disk=None,
        allow_code_execution=False,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_code_execution = allow_code_execution
        self.load_report = None
        self._loading_path = None
        self._verified = None  # (path, checkpoint dict) read while choosing what to resume from
        self._nothing_to_resume = False
        self._temporaries_checked = False

    # -------------------------------------------------------------------- loading
    def load(self, path, *args, **kwargs):
        self._loading_path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if self._verified is not None and self._verified[0] == filename:
            checkpoint, self._verified = self._verified[1], None
            return checkpoint
        return read_checkpoint(filename, allow_code_execution=self.allow_code_execution)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        # tensors of another shape are left out of the load, hence also listed as missing
        wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
        self.load_report = LoadReport(
            path=self._loading_path,
            num_model_tensors=len(self.model.state_dict()),
            missing=[k for k in incompatible.missing_keys if k not in wrong_shape],
            unexpected=list(incompatible.unexpected_keys),
            wrong_shape=list(incompatible.incorrect_shapes),
        )
        return incompatible

    def _log_incompatible_keys(self, incompatible):
        report = self.load_report
        if report.missing or report.unexpected or report.wrong_shape:
            self.logger.warning("Checkpoint does not fully fit the model: %s", report.summary())
        else:
            self.logger.info(
                "All %d model tensors loaded from %s", report.num_model_tensors, report.path
            )

    def load_for_inference(self, path, *, resume=False):
        """Load weights for evaluation / prediction: like :meth:`resume_or_load`, then raise
        unless every model tensor came from the file with its shape.

        Raises:
            CheckpointFileError: no weights given, or a bad / incomplete file.
        """
        self.load_report = None
        self.resume_or_load(path, resume=resume)
        if self.load_report is None:
            raise CheckpointFileError(
                path or "MODEL.WEIGHTS",
                "no weights to evaluate or predict with (MODEL.WEIGHTS is empty and nothing was "
                "resumed); give the trained checkpoint",
            )
        self.load_report.require_complete()

    # -------------------------------------------------------------------- resuming
    def has_checkpoint(self):
        return super().has_checkpoint() and not self._nothing_to_resume

    def _fallback_candidates(self, exclude):
        found = []
        for name in os.listdir(self.save_dir):
            full = os.path.join(self.save_dir, name)
            if _TRAINER_CHECKPOINT.fullmatch(name) and full != exclude and os.path.isfile(full):
                found.append((os.stat(full).st_mtime_ns, full))
        return [full for _, full in sorted(found, reverse=True)]

    def _newest_loadable(self):
        """(path, checkpoint) of the file named by ``last_checkpoint`` if it loads, else of the
        newest trainer checkpoint of the folder that does; None when none loads."""
        named = self.get_checkpoint_file()
        problems = []
        if named and os.path.isfile(named):
            candidates = [named] + self._fallback_candidates(named)
        else:
            problems.append(
                f"{os.path.join(self.save_dir, LAST_CHECKPOINT)} names no existing "
                f"file ({os.path.basename(named)!r})"
            )
            candidates = self._fallback_candidates(None)
        for path in candidates:
            try:
                checkpoint = read_checkpoint(path, allow_code_execution=self.allow_code_execution)
            except CorruptCheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                self.logger.warning(
                    "Resuming from %s, the newest checkpoint that loads, instead of the last "
                    "one; training continues from there and writes its checkpoints again. "
                    "Skipped: %s",
                    path,
                    " | ".join(problems),
                )
            return path, checkpoint
        self.logger.warning(
            "No checkpoint in %s loads, so training starts from MODEL.WEIGHTS at iteration 0. "
            "Skipped: %s",
            self.save_dir,
            " | ".join(problems) or "none found",
        )
        return None

    def resume_or_load(self, path, *, resume=True):
        """As Detectron2's, but a resume verifies that the last checkpoint loads and otherwise
        resumes from the newest one that does (or, if none does, loads ``path`` and reports no
        checkpoint through :meth:`has_checkpoint`, so that training starts at iteration 0)."""
        self._nothing_to_resume = False
        if resume and self.has_checkpoint():
            if self.save_to_disk:
                self._remove_stale_temporaries()
                self._temporaries_checked = True
            found = self._newest_loadable()
            if found is not None:
                self._verified = found
                extra = self.load(found[0])
                if found[0] != self.get_checkpoint_file():
                    self._rewrite_final_if_finished(found[0], extra)
                return extra
            self._nothing_to_resume = True
        return self.load(path, checkpointables=[])

    def _rewrite_final_if_finished(self, source, extra):
        """After resuming from a fallback checkpoint of the run's last iteration (the trainer
        has nothing left to train, so it would not save again), write ``model_final.pth`` from
        it: a finished run always ends with a final checkpoint that loads."""
        max_iter = getattr(self.checkpointables.get("trainer"), "max_iter", None)
        iteration = extra.get("iteration")
        if max_iter is None or iteration is None or iteration + 1 < max_iter:
            return
        self.logger.warning(
            "Rewriting model_final.pth from %s (iteration %d, the last one)", source, iteration
        )
        self.save("model_final", iteration=iteration)

    # -------------------------------------------------------------------- saving
    def save(self, name, **kwargs):
        """Write ``<save_dir>/<name>.pth`` atomically, then ``last_checkpoint`` naming it."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._temporaries_checked:
            self._remove_stale_temporaries()
            self._temporaries_checked = True
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_write(save_file) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        with atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT), "w") as f:
            f.write(last_filename_basename)

    def _remove_stale_temporaries(self):
        """Delete the temporary files that saves killed mid-write left in ``save_dir``."""
        names = remove_stale_temporary_files(self.save_dir)
        if names:
            self.logger.info(
                "Removed %d partial file(s) left in %s by an interrupted save: %s",
                len(names),
                self.save_dir,
                ", ".join(names),
            )
