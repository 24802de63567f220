"""Small utilities: atomic file writing (here) and pictures (``mask2former.utils.visualize``).

``visualize`` is not imported here so that code needing only :func:`atomic_write` does not load
matplotlib.
"""
import contextlib
import os
import uuid

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file lives in the same folder (so ``os.replace`` is an atomic rename) and is
    removed if the block raises: readers see either the previous file or the complete new one,
    never a partial file. The parent folder is created if needed.

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
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
