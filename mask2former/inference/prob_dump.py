"""Probability dumps for ensembling: one float16 [K, H, W] ``.npy`` per image, streamed to disk.

Layout of a dump folder::

    index.json      {"format": 1, "classes": [...], "dtype": "float16",
                     "images": [{"file_name": ..., "path": "000000.npy", "height": H, "width": W}]}
    000000.npy ...  per-image probabilities, written atomically as they arrive

Memory does not grow with the number of images: only the index entries are kept. A dump is
written into a temporary folder next to ``out_dir`` and switched into place when the writer
closes: a killed (re)run leaves the previous complete dump, or no folder at all. The reader
refuses a folder whose ``.npy`` files and index disagree.
"""

import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.io import (
    atomic_write,
    format_examples,
    make_temporary_directory,
    replace_directory,
)

__all__ = ["ProbDumpWriter", "ProbDumpReader"]

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


class ProbDumpWriter:
    """Streams per-image probabilities of one model into ``out_dir``.

    Use as a context manager; ``add(file_name, probs)`` per image. ``file_name`` is the key the
    ensemble matches images by (use the dataset's ``file_name`` as written in the json). The arrays
    go to a temporary folder next to ``out_dir``; :meth:`close` writes the index and replaces
    ``out_dir`` (an existing dump included) with it; an exception in the ``with`` block removes it.
    """

    def __init__(self, out_dir: str, class_names: Sequence[str], model_name: str = ""):
        self.out_dir = out_dir
        self.class_names = list(class_names)
        self.model_name = model_name
        self._entries: List[dict] = []
        self._seen: set = set()
        # (the temporaries a killed run left next to out_dir are removed first)
        self._tmp_dir: Optional[str] = make_temporary_directory(out_dir)

    def add(self, file_name: str, probs) -> None:
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu().numpy()
        if probs.ndim != 3 or probs.shape[0] != len(self.class_names):
            raise ValueError(
                f"{file_name}: expected probabilities "
                f"[{len(self.class_names)}, H, W], got {probs.shape}"
            )
        if self._tmp_dir is None:
            raise RuntimeError(f"{file_name}: the dump {self.out_dir} is already closed")
        if file_name in self._seen:
            raise ValueError(f"{file_name}: added twice to the dump {self.out_dir}")
        self._seen.add(file_name)
        name = f"{len(self._entries):06d}.npy"
        with atomic_write(os.path.join(self._tmp_dir, name)) as f:
            np.save(f, probs.astype(np.float16))
        self._entries.append(
            {
                "file_name": file_name,
                "path": name,
                "height": int(probs.shape[1]),
                "width": int(probs.shape[2]),
            }
        )

    def close(self) -> None:
        """Write the index and switch the complete dump into ``out_dir``."""
        if self._tmp_dir is None:
            return
        index = {
            "format": FORMAT_VERSION,
            "model": self.model_name,
            "classes": self.class_names,
            "dtype": "float16",
            "images": self._entries,
        }
        with atomic_write(os.path.join(self._tmp_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
        replace_directory(self._tmp_dir, os.path.abspath(self.out_dir))
        self._tmp_dir = None

    def abort(self) -> None:
        """Drop the arrays written so far; ``out_dir`` keeps its previous content."""
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class ProbDumpReader:
    """Reads a dump folder written by :class:`ProbDumpWriter`.

    Refuses a folder whose ``.npy`` files are not exactly those of its index; an array whose shape
    or dtype differs from its index entry, or that cannot be read, raises an error naming its path
    and its image when it is read.
    """

    def __init__(self, dump_dir: str):
        self.dump_dir = dump_dir
        index_path = os.path.join(dump_dir, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{index_path} not found: {dump_dir} is not "
                "a probability dump or it was interrupted"
            )
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: unsupported dump format {index.get('format')!r}")
        self.class_names: List[str] = index["classes"]
        self.model_name: str = index.get("model", "")
        self._entries: Dict[str, dict] = {e["file_name"]: e for e in index["images"]}
        self.file_names: List[str] = [e["file_name"] for e in index["images"]]
        self.dtype = np.dtype(index.get("dtype", "float16"))
        indexed = {e["path"] for e in index["images"]}
        present = {n for n in os.listdir(dump_dir) if n.endswith(".npy")}
        if indexed != present:
            raise ValueError(
                f"{dump_dir}: the arrays do not match {INDEX_NAME} (a mixed or damaged dump); "
                f"missing: {format_examples(indexed - present) or 'none'}; "
                f"not in the index: {format_examples(present - indexed) or 'none'}"
            )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, file_name: str) -> bool:
        return file_name in self._entries

    def get(self, file_name: str, dtype=np.float32) -> np.ndarray:
        """Probabilities [K, H, W] of one image."""
        entry = self._entries.get(file_name)
        if entry is None:
            raise KeyError(f"{file_name} is not in the probability dump {self.dump_dir}")
        path = os.path.join(self.dump_dir, entry["path"])
        try:
            probs = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(
                f"{path}: unreadable probability array of {file_name!r} in the dump "
                f"{self.dump_dir} ({type(e).__name__}: {e})"
            ) from e
        expected = (len(self.class_names), entry["height"], entry["width"])
        if probs.shape != expected or probs.dtype != self.dtype:
            raise ValueError(
                f"probability dump {self.dump_dir}: {file_name!r} holds an array of shape "
                f"{probs.shape} ({probs.dtype}), its index says {expected} ({self.dtype}): {path}"
            )
        return probs.astype(dtype)

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray]]:
        for name in self.file_names:
            yield name, self.get(name)

    def size_of(self, file_name: str) -> Optional[Tuple[int, int]]:
        entry = self._entries.get(file_name)
        return None if entry is None else (entry["height"], entry["width"])
