"""Small utilities: result writing and error-message examples (:mod:`.io`) and pictures
(:mod:`.visualize`, not imported here so that code writing files does not load matplotlib)."""

from .io import atomic_write

__all__ = ["atomic_write"]
