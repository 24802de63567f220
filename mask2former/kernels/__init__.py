"""The project's compiled CPU kernels, shared by the model (deformable attention, window
attention, the matcher's point sums) and the data pipeline (polygon rasterisation): the C++
sources in ``csrc/`` and :mod:`.loader`, which compiles them on first use and loads them."""

from .loader import (
    HEADERS,
    SOURCES,
    CPUKernelUnavailable,
    cpu_kernel_status,
    cpu_or_fallback,
    kernel_cache_dir,
    kernel_isa_level,
    load_library,
)

__all__ = [
    "CPUKernelUnavailable",
    "HEADERS",
    "SOURCES",
    "cpu_kernel_status",
    "cpu_or_fallback",
    "kernel_cache_dir",
    "kernel_isa_level",
    "load_library",
]
