"""Label map -> COCO polygons, exactly (used to convert label-map datasets, to write
pseudo-labels and the copy-paste bank).

One annotation per connected component (8-connectivity) per class; the background label and the
ignore label produce no annotation.

Exactness. Polygons are traced (``cv2.findContours``) on the component mask upsampled 2x, so
every vertex lies a quarter pixel inside the component's pixel boundary (coordinates are
multiples of 0.25 in COCO's continuous frame, where pixel ``(i, j)`` covers ``[j, j+1] x
[i, i+1]``). Pixel centres of the component are then strictly inside the polygon and all other
pixel centres strictly outside, so rasterising the annotation (pycocotools semantics, see
:mod:`.rasterize`) gives back exactly the component. Overlaps never occur, so the draw order does
not matter either.

Holes (``RETR_CCOMP`` hierarchy) are kept with "keyhole" polygons: each hole ring is appended to
its outer ring, joined by a bridge segment from the outer ring's first vertex to the hole's first
vertex, travelled once in each direction. Under the even-odd fill of COCO polygons the bridge
cancels out and the hole is empty. (Geometry libraries such as shapely call such polygons
invalid; COCO tools and this project's rasteriser fill them correctly.)

Components smaller than ``min_area`` pixels are dropped and counted (``small="drop"``) or kept
(``small="keep"``).
"""

import cv2
import numpy as np

__all__ = ["ConversionStats", "label_map_to_annotations"]


class ConversionStats:
    """Counts of a conversion: components written, and small components dropped (and their
    pixels)."""

    def __init__(self):
        self.components = 0
        self.dropped_components = 0
        self.dropped_pixels = 0

    def update(self, other):
        self.components += other.components
        self.dropped_components += other.dropped_components
        self.dropped_pixels += other.dropped_pixels

    def __repr__(self):
        return (
            f"ConversionStats(components={self.components}, dropped_components="
            f"{self.dropped_components}, dropped_pixels={self.dropped_pixels})"
        )


def _contour_to_points(contour):
    """cv2 contour of the 2x mask -> N x 2 float coordinates in the original image frame."""
    return (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0


def _keyhole(outer, holes):
    """One flat polygon: the outer ring, then each hole ring bridged from outer[0]."""
    parts = [outer]
    for hole in holes:
        parts.append(outer[:1])
        parts.append(hole)
        parts.append(hole[:1])
    return np.concatenate(parts).reshape(-1).tolist()


def _component_polygons(mask):
    """Keyhole polygons (one per outer contour) of a binary mask."""
    big = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole: handled with its parent
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            holes.append(_contour_to_points(contours[child]))
            child = hierarchy[child][0]
        polygons.append(_keyhole(_contour_to_points(contour), holes))
    return polygons


def label_map_to_annotations(
    label, ignore_label=255, background=0, min_area=0, small="drop", stats=None
):
    """COCO annotations (without ids) of a label map.

    Args:
        label (np.ndarray): H x W integer label map.
        ignore_label (int or None): label producing no annotation.
        background (int or None): label producing no annotation (None: every label is a class,
            e.g. CamVid where 0 is "sky").
        min_area (int): components with fewer pixels are "small".
        small (str): "drop" (counted in ``stats``) or "keep".
        stats (ConversionStats or None): updated in place.

    Returns:
        list[dict]: ``category_id`` (= label value), ``segmentation`` (one keyhole polygon),
        ``area`` (pixel count), ``bbox`` (pixel extent), ``iscrowd`` 0.
    """
    if small not in ("drop", "keep"):
        raise ValueError(f"small must be 'drop' or 'keep', got {small!r}")
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label maps must be H x W, got shape {label.shape}")
    stats = stats if stats is not None else ConversionStats()
    annotations = []
    for value in np.unique(label):
        if value == ignore_label or value == background:
            continue
        n, components, boxes, _ = cv2.connectedComponentsWithStats(
            (label == value).astype(np.uint8), connectivity=8
        )
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in boxes[k])
            if area < min_area and small == "drop":
                stats.dropped_components += 1
                stats.dropped_pixels += area
                continue
            # Crop with a 1-pixel margin so that the contour tracer sees the border.
            x0, y0 = max(x - 1, 0), max(y - 1, 0)
            crop = components[y0 : y + h + 1, x0 : x + w + 1] == k
            for flat in _component_polygons(crop):
                xy = np.asarray(flat).reshape(-1, 2) + (x0, y0)
                annotations.append(
                    {
                        "category_id": int(value),
                        "segmentation": [xy.reshape(-1).tolist()],
                        "area": float(area),
                        "bbox": [float(x), float(y), float(w), float(h)],
                        "iscrowd": 0,
                    }
                )
            stats.components += 1
    return annotations
