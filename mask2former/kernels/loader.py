"""The project's CPU kernels: C++ sources compiled on first use into one shared library.

``csrc/`` holds the kernels (plain C++17, no PyTorch headers): the deformable attention's
forward and backward (``deformable_attention_cpu.cpp``, wrapped by
``mask2former/modeling/pixel_decoder/deformable_attention_cpu.py``), the Hungarian matcher's
point sums (``matcher_cpu.cpp``, used by ``mask2former/modeling/matcher.py``), Swin's window
attention, forward and backward (``window_attention_cpu.cpp``, wrapped by
``mask2former/modeling/backbone/window_attention_cpu.py``) and the COCO
polygon scan and fill of the label maps (``rasterize_cpu.cpp``, used by
``mask2former/data/masks/rasterize.py``).
:func:`load_library` compiles them once per sources, compiler and flags into one shared library
in the kernel cache
(``$MASK2FORMER_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/trash-mask2former/kernels``, else
``~/.cache/trash-mask2former/kernels``; about 6 s with g++) and loads it with ctypes. The
library is written under a temporary name and renamed into place, so processes starting
together (a multi-GPU launch) never load a partial file. The compiler is ``$CXX`` or the first
of ``c++``, ``g++``, ``clang++`` on the path.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "CPUKernelUnavailable",
    "cpu_kernel_status",
    "cpu_or_fallback",
    "kernel_cache_dir",
    "kernel_isa_level",
    "load_library",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    _CSRC / "deformable_attention_cpu.cpp",
    _CSRC / "matcher_cpu.cpp",
    _CSRC / "rasterize_cpu.cpp",
    _CSRC / "window_attention_cpu.cpp",
)
HEADERS = (_CSRC / "kernel_common.h",)
# -O3 vectorises the channel loops; the kernels carry their own per-ISA clones (x86-64);
# -fopenmp: the threads are OpenMP's (PyTorch's own pool, see kernel_common.h).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


class CPUKernelUnavailable(RuntimeError):
    """The CPU kernels cannot be built or loaded here (the message says why)."""


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("MASK2FORMER_KERNEL_CACHE"):
        return Path(os.environ["MASK2FORMER_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trash-mask2former" / "kernels"


def _compiler() -> str:
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        path = name and shutil.which(name)
        if path:
            return path
    raise CPUKernelUnavailable(
        "no C++ compiler found ($CXX, c++, g++ or clang++) to build the CPU kernels"
    )


def _library_path(compiler: str) -> Path:
    """Cache path keyed by the sources, the compiler's version and the flags."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CPUKernelUnavailable(f"{compiler} --version failed: {e}") from e
    key = hashlib.sha256()
    parts = [path.read_bytes() for path in SOURCES + HEADERS]
    for part in (*parts, version.encode(), " ".join(FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    return kernel_cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCES` into ``target`` through a temporary file in its directory."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    except OSError as e:
        raise CPUKernelUnavailable(f"cannot write to the kernel cache {target.parent}: {e}") from e
    os.close(fd)
    names = " ".join(str(path) for path in SOURCES)
    logger.info("Compiling the CPU kernels into %s (once)", target)
    try:
        try:
            result = subprocess.run(
                [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise CPUKernelUnavailable(f"{compiler} could not compile {names}: {e}") from e
        if result.returncode != 0:
            raise CPUKernelUnavailable(
                f"{compiler} failed to compile {names} (exit {result.returncode}):\n"
                f"{result.stderr[-2000:]}"
            )
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide a shared cache's library from others
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> ctypes.CDLL:
    compiler = _compiler()
    path = _library_path(compiler)
    if not path.exists():
        _build(compiler, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise CPUKernelUnavailable(f"cannot load {path}: {e}") from e
    return lib


def load_library() -> ctypes.CDLL:
    """The kernel library, compiled into the cache on the first call of any process that does
    not find it there; raises :class:`CPUKernelUnavailable` with the reason when that fails.
    Callers declare the argument types of the functions they use (once: ctypes keeps them)."""
    with _LOCK:
        return _load()


def kernel_isa_level() -> int:
    """The instruction-set copy the kernels run: 4 (x86-64-v4, AVX-512: 64-byte vectors), 3
    (x86-64-v3, AVX2 + FMA: 32 bytes) or 0 (baseline); ``$MASK2FORMER_KERNEL_ISA`` ("v3" or
    "base") caps it, read when the library is loaded."""
    lib = load_library()
    lib.cpu_kernels_isa_level.restype = ctypes.c_int
    return int(lib.cpu_kernels_isa_level())


@functools.cache
def cpu_kernel_status() -> Optional[str]:
    """None when the kernels load, else the reason they do not (tried once per process)."""
    try:
        load_library()
    except CPUKernelUnavailable as e:
        return str(e)
    return None


# (torch.compile takes the answer as a constant of the graph instead of tracing the library
# load and its lock, which would split the graph at every call)
@functools.cache
@torch.compiler.assume_constant_result
def cpu_or_fallback(what: str, fallback: str) -> str:
    """ "cpu" when the kernels load here, else ``fallback``, the slower PyTorch path of ``what``
    (e.g. "Deformable attention on CPU"), with a warning that says why (once per ``what``)."""
    reason = cpu_kernel_status()
    if reason is None:
        return "cpu"
    logger.warning(
        "%s: the compiled CPU kernels are not available (%s); using the slower PyTorch path %r",
        what,
        reason,
        fallback,
    )
    return fallback
