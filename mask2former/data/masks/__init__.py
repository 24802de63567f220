"""Label maps and polygons: COCO polygons -> label map (:mod:`.rasterize`) and label map ->
COCO polygons (:mod:`.trace`), exact inverses of each other."""

from .rasterize import DRAW_ORDERS, polygons_to_label_map, record_to_label_map
from .trace import ConversionStats, label_map_to_annotations

__all__ = [
    "DRAW_ORDERS",
    "ConversionStats",
    "label_map_to_annotations",
    "polygons_to_label_map",
    "record_to_label_map",
]
