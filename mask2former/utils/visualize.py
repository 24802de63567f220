"""Pictures of label maps: palette colouring, overlays, comparison panels, confusion matrices.

All images are RGB ``uint8`` arrays (H, W, 3); label maps are integer arrays (H, W). A palette is
a sequence of RGB triples indexed by label (e.g. the ``stuff_colors`` of a dataset's metadata).
Files are PNGs written atomically.
"""

import io

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import atomic_write

__all__ = [
    "palette_array",
    "label_map_to_color",
    "boundary_mask",
    "overlay",
    "legend",
    "make_panel",
    "save_panel",
    "encode_png",
    "write_png",
    "confusion_matrix_png",
    "plot_confusion_matrix",
]

# Legend layout (pixels) and font (OpenCV Hershey fonts: no font files needed, deterministic).
_LEGEND_ROW = 18
_LEGEND_SWATCH = 12
_LEGEND_PAD = 4
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4


def palette_array(palette):
    """``palette`` (sequence of RGB triples) as a (N, 3) uint8 array, validated."""
    colors = np.asarray(palette)
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] == 0:
        raise ValueError(f"palette must be a non-empty sequence of RGB triples, got {colors.shape}")
    if colors.min() < 0 or colors.max() > 255:
        raise ValueError("palette colours must lie in [0, 255]")
    return colors.astype(np.uint8)


def _in_palette(label_map, num_colors):
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    return (label_map >= 0) & (label_map < num_colors)


def label_map_to_color(label_map, palette, unknown_color=(255, 255, 255)):
    """Colour a label map.

    Args:
        label_map: (H, W) integer labels.
        palette: sequence of RGB triples; label ``i`` gets ``palette[i]``.
        unknown_color: RGB for labels outside the palette (e.g. the ignore label 255).

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    colors = palette_array(palette)
    label_map = np.asarray(label_map)
    known = _in_palette(label_map, len(colors))
    out = np.empty(label_map.shape + (3,), dtype=np.uint8)
    out[:] = np.asarray(unknown_color, dtype=np.uint8)
    out[known] = colors[label_map[known]]
    return out


def boundary_mask(label_map):
    """Boolean (H, W): pixels with at least one 4-neighbour of a different label."""
    label_map = np.asarray(label_map)
    edge = np.zeros(label_map.shape, dtype=bool)
    vertical = label_map[1:, :] != label_map[:-1, :]
    horizontal = label_map[:, 1:] != label_map[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def overlay(image_rgb, label_map, palette, alpha=0.5, draw_boundaries=True):
    """Blend the colours of a label map onto an image.

    Every pixel whose label is in the palette becomes
    ``round((1 - alpha) * image + alpha * palette[label])`` (round half up); pixels with other
    labels (e.g. the ignore label) keep the image colour. With ``draw_boundaries``, pixels on a
    label boundary (see :func:`boundary_mask`) get their class colour at full opacity.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    label_map = np.asarray(label_map)
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label map {label_map.shape} and image {image.shape[:2]} sizes differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colors = palette_array(palette)
    known = _in_palette(label_map, len(colors))
    label_colors = colors[np.where(known, label_map, 0)].astype(np.float32)
    blended = np.floor((1.0 - alpha) * image.astype(np.float32) + alpha * label_colors + 0.5)
    out = np.where(known[..., None], blended.astype(np.uint8), image)
    if draw_boundaries:
        edge = boundary_mask(label_map) & known
        out[edge] = colors[label_map[edge]]
    return out


def _text_width(text):
    (width, _), _ = cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)
    return width


def legend(labels, palette, class_names, width):
    """A white strip listing ``labels`` as colour swatch + class name, wrapped to ``width``.

    Returns:
        (rows * 18 + 4, width, 3) uint8 RGB image; height 0 when ``labels`` is empty.
    """
    colors = palette_array(palette)
    if len(labels) == 0:
        return np.zeros((0, width, 3), dtype=np.uint8)
    entries = []
    for label in labels:
        entry_width = _LEGEND_SWATCH + 2 * _LEGEND_PAD + _text_width(class_names[label]) + 8
        entries.append((label, entry_width))
    # Greedy line filling; an entry wider than the strip gets a line of its own (text clipped).
    rows, x = [[]], 0
    for label, entry_width in entries:
        if rows[-1] and x + entry_width > width:
            rows.append([])
            x = 0
        rows[-1].append((label, x))
        x += entry_width
    strip = np.full((len(rows) * _LEGEND_ROW + _LEGEND_PAD, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        top = _LEGEND_PAD + r * _LEGEND_ROW
        for label, x in row:
            left = x + _LEGEND_PAD
            swatch = strip[top : top + _LEGEND_SWATCH, left : left + _LEGEND_SWATCH]
            swatch[:] = 0  # 1-pixel black frame, so black / white classes stay visible
            swatch[1:-1, 1:-1] = colors[label]
            origin = (left + _LEGEND_SWATCH + _LEGEND_PAD, top + _LEGEND_SWATCH - 2)
            cv2.putText(
                strip, class_names[label], origin, _FONT, _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA
            )
    return strip


def make_panel(image_rgb, gt_label_map, pred_label_map, palette, class_names, alpha=0.5):
    """Side-by-side ``image | ground-truth overlay | prediction overlay`` with a legend below.

    Args:
        image_rgb: (H, W, 3) uint8.
        gt_label_map: (H, W) labels, or None (unlabeled image: the panel is ``image | prediction``).
        pred_label_map: (H, W) labels.
        palette: RGB per label. class_names: name per label.
        alpha: overlay opacity (see :func:`overlay`).

    Returns:
        (H + legend height, n * W, 3) uint8 with n = 3 (2 without ground truth); the legend lists
        the classes (within the palette) present in the ground truth or the prediction.
    """
    colors = palette_array(palette)
    if len(class_names) < len(colors):
        raise ValueError(f"{len(class_names)} class names for a palette of {len(colors)} colours")
    tiles = [np.asarray(image_rgb)]
    label_maps = [m for m in (gt_label_map, pred_label_map) if m is not None]
    tiles += [overlay(image_rgb, m, colors, alpha=alpha) for m in label_maps]
    top = np.concatenate(tiles, axis=1)
    present = np.unique(np.concatenate([np.unique(m) for m in label_maps]))
    present = [int(v) for v in present if 0 <= v < len(colors)]
    strip = legend(present, colors, class_names, top.shape[1])
    return np.concatenate([top, strip], axis=0)


def encode_png(image_rgb):
    """PNG bytes of an RGB uint8 image."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.asarray(image_rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {np.shape(image_rgb)}")
    return encoded.tobytes()


def write_png(path, image_rgb):
    """Write an RGB uint8 image as PNG, atomically."""
    encoded = encode_png(image_rgb)
    with atomic_write(path, "wb") as f:
        f.write(encoded)


def save_panel(path, image_rgb, gt_label_map, pred_label_map, palette, class_names, alpha=0.5):
    """:func:`make_panel` written to ``path`` as PNG (atomically). Returns the panel."""
    panel = make_panel(image_rgb, gt_label_map, pred_label_map, palette, class_names, alpha)
    write_png(path, panel)
    return panel


def plot_confusion_matrix(cm, class_names, path, title=None):
    """Save :func:`confusion_matrix_png` to ``path`` (atomically)."""
    encoded = confusion_matrix_png(cm, class_names, title)
    with atomic_write(path, "wb") as f:
        f.write(encoded)


def confusion_matrix_png(cm, class_names, title=None):
    """PNG bytes of a row-normalised confusion matrix picture.

    Args:
        cm: (K, K) counts, rows = ground truth, columns = prediction.
        class_names: K names.
        title: optional figure title.

    Cell (i, j) shows the fraction of ground-truth class i pixels predicted as j; rows without
    ground-truth pixels are drawn grey. Values are printed in the cells for K <= 25.
    """
    cm = np.asarray(cm, dtype=np.float64)
    num_classes = len(class_names)
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix {cm.shape} does not match {num_classes} class names")
    row_sums = cm.sum(axis=1, keepdims=True)
    normalized = np.divide(cm, row_sums, out=np.full_like(cm, np.nan), where=row_sums > 0)

    side = max(4.0, 0.45 * num_classes + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(normalized), cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    if num_classes <= 25:
        for i, j in zip(*np.nonzero(np.isfinite(normalized))):
            value = normalized[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value > 0.5 else "black",
            )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
