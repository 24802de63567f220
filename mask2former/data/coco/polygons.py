"""Checking and cleaning COCO polygons: parsing, clipping to the image, degenerate shapes,
extent and area."""

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..masks.rasterize import polygon_area

__all__ = ["PolygonStats", "clip_polygon", "is_collinear", "polygon_array", "union_bbox"]


def clip_polygon(xy, width, height):
    """Sutherland-Hodgman clip of a polygon (N x 2 array) to ``[0, width] x [0, height]``."""
    pts = [tuple(p) for p in xy]
    for axis, bound, keep_below in (
        (0, 0.0, False),
        (0, width, True),
        (1, 0.0, False),
        (1, height, True),
    ):
        if not pts:
            break
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cur_in = cur[axis] <= bound if keep_below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_below else prev[axis] >= bound
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cross[axis] = bound
                out.append(tuple(cross))
            if cur_in:
                out.append(cur)
        pts = out
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def is_collinear(xy):
    """True if all points of an N x 2 array lie on one line (zero-area polygon)."""
    d = xy - xy[0]
    far = d[np.argmax((d**2).sum(1))]
    norm2 = float((far**2).sum())
    if norm2 == 0.0:
        return True
    cross = far[0] * d[:, 1] - far[1] * d[:, 0]
    return float(np.abs(cross).max()) <= 1e-9 * norm2


def polygon_array(poly):
    """N x 2 float array of a flat polygon, or a string saying why it is invalid."""
    if not isinstance(poly, (list, tuple)):
        return f"polygon is a {type(poly).__name__}, not a list"
    if len(poly) % 2:
        return f"odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return f"{len(poly) // 2} points"
    values = np.asarray(poly)
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        return "non-numeric coordinates"
    xy = values.astype(np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all():
        return "non-finite coordinates"
    return xy


@dataclass
class PolygonStats:
    """A valid polygon (N x 2 array and flat list) with its extent and area."""

    xy: np.ndarray
    flat: list
    lo: Tuple[float, float]
    hi: Tuple[float, float]
    area: float

    @classmethod
    def of(cls, xy, flat=None):
        lo, hi = xy.min(0), xy.max(0)
        return cls(
            xy,
            list(flat) if flat is not None else xy.reshape(-1).tolist(),
            (float(lo[0]), float(lo[1])),
            (float(hi[0]), float(hi[1])),
            polygon_area(xy),
        )

    def is_degenerate(self):
        """Zero area: all points collinear (a figure-eight may have zero shoelace area but is
        not degenerate)."""
        extent = max(self.hi[0] - self.lo[0], self.hi[1] - self.lo[1])
        return self.area <= 1e-9 * extent * extent and is_collinear(self.xy)

    def perimeter(self):
        closed = np.concatenate([self.xy, self.xy[:1]])
        return float(np.hypot(*np.diff(closed, axis=0).T).sum())


def union_bbox(polygons):
    """COCO [x, y, w, h] box around :class:`PolygonStats`."""
    x0, y0 = min(p.lo[0] for p in polygons), min(p.lo[1] for p in polygons)
    x1, y1 = max(p.hi[0] for p in polygons), max(p.hi[1] for p in polygons)
    return [x0, y0, x1 - x0, y1 - y0]


# ---------------------------------------------------------------------------------- loading
