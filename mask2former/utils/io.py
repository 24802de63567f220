"""Writing results so that a killed run leaves the previous complete result or nothing, and
formatting examples for error messages.

Files are written to a temporary file in the same folder, flushed to disk and renamed onto the
final path; folders are filled under a temporary name next to the final one and swapped in.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid

__all__ = [
    "atomic_directory",
    "atomic_write",
    "format_examples",
    "make_temporary_directory",
    "remove_stale_temporaries",
    "remove_stale_temporary_files",
    "replace_directory",
    "write_json",
]


def _temporary_prefix(final_path):
    """Hidden name prefix of the temporaries of ``final_path``: ``.tmp_<name>.``."""
    return f".tmp_{os.path.basename(os.path.normpath(final_path))}."


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# Temporary files of atomic_write: ".<target name>.<pid>.<8 hex>.tmp" in the target's folder.
_TEMPORARY_FILE = r"(\d+)\.[0-9a-f]{8}\.tmp"


def _remove_dead_temporaries(folder, patterns, files_only=False):
    """Remove the entries of ``folder`` that fully match one of ``patterns`` (group 1: the pid
    of the process that made them) and whose process is no longer alive; returns their paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in sorted(os.listdir(folder)):
        match = next((m for m in (p.fullmatch(entry) for p in patterns) if m), None)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            if files_only:
                continue
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def remove_stale_temporaries(final_path):
    """Remove the temporaries of ``final_path`` left by killed processes; returns their paths.

    Only names this module gives (``.tmp_<name>.<pid>.<8 hex>`` folders of
    :func:`make_temporary_directory`, ``.<name>.<pid>.<8 hex>.tmp`` files of
    :func:`atomic_write`) next to ``final_path`` whose process is no longer alive on this machine:
    another run's folder in progress, or anything else in the parent folder, is left alone.
    """
    final_path = os.path.abspath(final_path)
    parent, name = os.path.split(final_path)
    patterns = (
        re.compile(re.escape(_temporary_prefix(final_path)) + r"(\d+)\.[0-9a-f]{8}"),
        re.compile(re.escape(f".{name}.") + _TEMPORARY_FILE),
    )
    return _remove_dead_temporaries(parent, patterns)


def remove_stale_temporary_files(folder):
    """Remove the temporary files that :func:`atomic_write` calls of processes no longer alive
    left in ``folder`` (for any target there); returns their names, sorted. Folders and other
    files are left alone."""
    pattern = re.compile(r"\..+\." + _TEMPORARY_FILE)
    removed = _remove_dead_temporaries(folder, (pattern,), files_only=True)
    return [os.path.basename(path) for path in removed]


def _fsync_directory(directory):
    """Make a rename inside ``directory`` durable (POSIX; elsewhere a rename is all there is)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_temporary_directory(final_dir):
    """A new empty folder ``.tmp_<name>.<pid>.<8 hex>`` next to ``final_dir`` (parent created),
    with normal permissions (umask), after removing the stale temporaries of ``final_dir``
    (:func:`remove_stale_temporaries`). Fill it, then :func:`replace_directory` it into place."""
    final_dir = os.path.abspath(final_dir)
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    remove_stale_temporaries(final_dir)
    tmp_dir = os.path.join(
        os.path.dirname(final_dir),
        f"{_temporary_prefix(final_dir)}{os.getpid()}.{uuid.uuid4().hex[:8]}",
    )
    os.makedirs(tmp_dir)
    return tmp_dir


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder (so ``os.replace`` is an atomic rename), is
    flushed to disk before the rename (the folder after it), and is removed if the block raises:
    readers see either the previous file or the complete new one, never a partial file. A kill
    leaves at most the hidden temporary, which :func:`remove_stale_temporaries` (of ``path``) and
    :func:`remove_stale_temporary_files` (of its folder) delete. The parent folder is created if
    needed.

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
        _fsync_directory(directory)
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
        # named as a temporary: removed by a later run if a kill leaves it behind
        old = make_temporary_directory(final_dir)
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

    The temporary folder (named ``prefix`` + a random suffix; default: that of
    :func:`make_temporary_directory`, which also removes stale ones) is removed if the block
    raises (``final_dir`` is then untouched).
    """
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    if prefix is None:
        tmp_dir = make_temporary_directory(final_dir)
    else:
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
