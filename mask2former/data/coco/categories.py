"""json category ids -> contiguous labels (label 0 is background, every pixel no annotation
covers)."""

from dataclasses import dataclass
from typing import Dict, List, Tuple

from .json_file import read_coco_json

__all__ = ["CategoryMapping", "build_category_mapping", "read_coco_categories"]


@dataclass
class CategoryMapping:
    """json category id -> contiguous label, and class names indexed by label."""

    category_id_to_label: Dict[int, int]
    class_names: List[str]
    background_ids: Tuple[int, ...] = ()


def _is_background_name(name):
    return str(name).strip().strip("_- ").lower() == "background"


def build_category_mapping(categories, json_file, category_id_to_label=None, report=None):
    """Map json categories to labels.

    Args:
        categories (list[dict]): the json's "categories".
        json_file (str): for error messages.
        category_id_to_label (dict or None): a fixed mapping (e.g. the trash classes); json
            categories outside it (other than background-named ones) are an error.
        report (ValidationReport or None): receives the background / remap lines.
    """
    seen = {}
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(f"{json_file}: invalid category entry {cat!r} (needs int id and name)")
        if cat["id"] in seen:
            raise ValueError(f"{json_file}: category id {cat['id']} is defined twice")
        seen[cat["id"]] = str(cat["name"])
    background = tuple(cid for cid, name in seen.items() if _is_background_name(name))
    for cid in background:
        if report is not None:
            report.add("background_category", f"category {cid} {seen[cid]!r}", "-> label 0")
    real = sorted(cid for cid in seen if cid not in background)
    if category_id_to_label is not None:
        unexpected = [cid for cid in real if cid not in category_id_to_label]
        if unexpected:
            raise ValueError(
                f"{json_file}: categories {[(c, seen[c]) for c in unexpected]} are not among the "
                f"expected categories {sorted(category_id_to_label)}"
            )
        return CategoryMapping(dict(category_id_to_label), [], background)
    mapping = {cid: i + 1 for i, cid in enumerate(real)}
    for cid in background:
        mapping[cid] = 0
    if report is not None:
        for cid in real:
            if mapping[cid] != cid:
                report.add(
                    "category_remap", f"category {cid} {seen[cid]!r}", f"-> label {mapping[cid]}"
                )
    names = ["Background"] + [seen[cid] for cid in real]
    return CategoryMapping(mapping, names, background)


def read_coco_categories(json_file, category_id_to_label=None):
    """Category mapping and whether the json has ground truth, without validating the rest."""
    data = read_coco_json(json_file)
    if "pseudo_labels" in data:
        # its polygons leave out the ignored (not confident) pixels: read as a plain COCO json
        # they would silently become background
        raise ValueError(
            f"{json_file} is a pseudo-label split (tools/pseudo_label.py): register it with "
            "DATASETS.PSEUDO_LABELS, which reads its label PNGs with their ignored pixels"
        )
    mapping = build_category_mapping(data.get("categories", []), json_file, category_id_to_label)
    return mapping, bool(data.get("annotations"))
