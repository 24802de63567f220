"""Process-wide CPU settings of the commands that run a model (training, evaluation, prediction):
denormal floats flushed to zero, and freed host memory kept for reuse.

:func:`setup_cpu_runtime` applies the config keys ``FLUSH_DENORMALS`` and ``REUSE_HOST_MEMORY``
at the start of every process that runs a model (each worker of a multi-process launch does it
itself) and logs what it did. Both only change speed, not results beyond what the docstrings of
the two functions below say.
"""

import ctypes
import logging
import platform
from typing import Dict

import torch

__all__ = ["flush_denormals", "reuse_freed_host_memory", "setup_cpu_runtime"]

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
# Heap growth requested from the kernel beyond each need (it is only paged in when used).
_TOP_PAD_BYTES = 256 << 20
# Free memory at the top of the heap is returned to the kernel only beyond this (mallopt's
# largest value, 2 GiB).
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def flush_denormals() -> bool:
    """
    Floating-point arithmetic on CPU threads flushes denormal (subnormal) results to zero and
    reads denormal inputs as zero (``torch.set_flush_denormal(True)``; MKL's and OpenMP's
    worker threads follow the calling thread's mode). Denormal floats (below 1.2e-38) take a slow
    microcode path in every instruction that touches them: Swin's shift mask (-100) makes
    attention weights of about e^-100, denormal, and each product with one of them is slow (one
    2000 x 2000 float32 product of denormals here: 9.7 s instead of 0.05 s). What it changes lies
    below 1.2e-38 in magnitude, far under float32 rounding of any value the model uses.

    Returns whether the CPU supports it (x86 with SSE3; ARM). GPU arithmetic is not affected.
    """
    return torch.set_flush_denormal(True)


def reuse_freed_host_memory() -> bool:
    """
    Make glibc's ``malloc`` keep the memory that tensors free, for the next tensors to reuse.

    By default glibc serves large blocks with their own ``mmap`` and returns them to the kernel
    when freed, and trims the top of its heap; the next training step's tensors of the same sizes
    then fault their pages in again, each page zero-filled by the kernel: 20k-35k page faults and
    0.15-0.3 s of system time per training step of Swin-T Mask2Former (batch 2 of 256x256) on the
    2-core machine of the README. Here every block comes from the heap (``M_MMAP_MAX`` 0), whose
    top is trimmed only when more than 2 GiB of it are free (``M_TRIM_THRESHOLD``), with 256 MiB
    of extra growth per request (``M_TOP_PAD``): a process keeps the host memory of its peak, as
    PyTorch's CUDA caching allocator does with GPU memory. The heap settles after a few
    repetitions of the same allocations, not at once: glibc splits a small remainder off behind
    each aligned block PyTorch asks for, and until those remainders are consolidated a freed block
    cannot merge with its neighbours (a 64 MiB tensor allocated and freed in a loop faults its
    pages in again 1 to 6 times, by the heap's layout, then never). When the heap cannot grow,
    glibc still falls back to ``mmap``.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = (
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, _TOP_PAD_BYTES),
    )
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success
    return all([libc.mallopt(param, value) == 1 for param, value in settings])


def setup_cpu_runtime(cfg) -> Dict[str, bool]:
    """Apply ``cfg.FLUSH_DENORMALS`` and ``cfg.REUSE_HOST_MEMORY`` to this process; returns
    what took effect ({"flush_denormals": ..., "reuse_host_memory": ...}), also logged."""
    applied = {
        "flush_denormals": bool(cfg.FLUSH_DENORMALS) and flush_denormals(),
        "reuse_host_memory": bool(cfg.REUSE_HOST_MEMORY) and reuse_freed_host_memory(),
    }
    for key, name in (
        ("flush_denormals", "FLUSH_DENORMALS"),
        ("reuse_host_memory", "REUSE_HOST_MEMORY"),
    ):
        if cfg.get(name) and not applied[key]:
            logger.warning("%s is set but not supported on this platform; left off", name)
    logger.info("CPU runtime: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
    return applied
