"""Histogram pictures for the report, as PNG bytes (matplotlib, Agg backend)."""

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["objects_per_image_png", "object_size_png"]

_DPI = 100


def _figure(width=6.4):
    fig = Figure(figsize=(width, 2.6), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # keeps an outside legend
    return buffer.getvalue()


def objects_per_image_png(objects_per_image):
    """Bar chart: number of images (y) with n objects (x), one bar per n."""
    counts = np.bincount(np.asarray(objects_per_image, dtype=np.int64), minlength=1)
    fig, ax = _figure()
    ax.bar(np.arange(len(counts)), counts, width=0.8, color="#4c72b0")
    ax.set_xlabel("objects per image")
    ax.set_ylabel("images")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def object_size_png(object_labels, object_areas, class_names, palette, bins=24):
    """Histogram of object sizes (pixels, logarithmic bins), stacked per class in class colours.

    Objects of zero area are counted in the first bin.
    """
    labels = np.asarray(object_labels, dtype=np.int64)
    areas = np.maximum(np.asarray(object_areas, dtype=np.float64), 1.0)
    fig, ax = _figure(width=7.6)
    if areas.size:
        edges = np.logspace(0, np.log10(areas.max()) + 1e-6, bins + 1)
        present = [c for c in range(len(class_names)) if np.any(labels == c)]
        ax.hist(
            [areas[labels == c] for c in present],
            bins=edges,
            stacked=True,
            color=[np.asarray(palette[c], dtype=np.float64) / 255.0 for c in present],
            label=[class_names[c] for c in present],
            edgecolor="white",
            linewidth=0.3,
        )
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("object size (pixels)")
    ax.set_ylabel("objects")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
