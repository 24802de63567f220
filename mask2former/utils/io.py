"""Writing results so that a killed run leaves the previous complete result or nothing, and
formatting examples for error messages.

Files are written to a temporary file in the same folder, flushed to disk and renamed onto the
final path; folders are filled under a temporary name next to the final one and swapped in.
"""

import contextlib
import json
import os
import shutil
import tempfile
import uuid

__all__ = ["atomic_directory", "atomic_write", "format_examples", "replace_directory", "write_json"]


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder (so ``os.replace`` is an atomic rename), is
    flushed to disk before the rename, and is removed if the block raises: readers see either
    the previous file or the complete new one, never a partial file. The parent folder is
    created if needed.

    Args:
        path (str): final local path.
        mode (str): "wb" (bytes) or "w" (text, UTF-8, "\\n" line endings).

    Yields:
        the open temporary file object.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    )
    # "x": fail rather than clobber; normal permissions (umask), unlike tempfile.mkstemp's 0600.
    text_args = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    try:
        with open(tmp_path, mode.replace("w", "x"), **text_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_json(path, data, **dump_kwargs):
    """Write ``data`` as JSON to ``path`` atomically (``dump_kwargs`` go to ``json.dump``)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, **dump_kwargs)


def replace_directory(tmp_dir, final_dir, overwrite=True):
    """Move the complete folder ``tmp_dir`` onto ``final_dir`` (same parent folder).

    An existing ``final_dir`` is moved aside first and removed once the new folder is in place
    (put back if the move fails); with ``overwrite`` False an existing ``final_dir`` is an error.
    """
    old = None
    if os.path.exists(final_dir):
        if not overwrite:
            raise FileExistsError(f"{final_dir} already exists (pass overwrite to replace it)")
        old = tempfile.mkdtemp(
            prefix=f".old_{os.path.basename(final_dir)}_", dir=os.path.dirname(final_dir)
        )
        os.rename(final_dir, os.path.join(old, "previous"))
    try:
        os.rename(tmp_dir, final_dir)
    except BaseException:
        if old is not None:  # put the previous folder back
            os.rename(os.path.join(old, "previous"), final_dir)
            os.rmdir(old)
        raise
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(final_dir, overwrite=True, prefix=None):
    """Yield a temporary folder next to ``final_dir``; swap it in when the block succeeds.

    The temporary folder (named ``prefix`` + a random suffix; default ``.tmp_<name>_``) is
    removed if the block raises (``final_dir`` is then untouched).
    """
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    prefix = prefix or f".tmp_{os.path.basename(final_dir)}_"
    tmp_dir = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp_dir
        replace_directory(tmp_dir, final_dir, overwrite)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)


def format_examples(items, n=5, sort=True, quote=False):
    """Up to ``n`` of ``items`` for an error message: "a, b, c, ... (N in all)".

    Args:
        sort (bool): show the smallest items (else the first ones).
        quote (bool): show each item's ``repr`` (else its ``str``).
    """
    items = sorted(items) if sort else list(items)
    text = repr if quote else str
    shown = ", ".join(text(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
