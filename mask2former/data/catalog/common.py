"""What every dataset registration shares: the metadata conventions, the palette of datasets
without their own colours, idempotent registration and the per-process record cache.

Registration is cheap and idempotent; records are loaded the first time ``DatasetCatalog.get``
is called, then cached per process (as a pickle: every call returns a fresh copy that callers may
modify). The cache keeps the records of the most recently loaded datasets only.

Metadata: ``stuff_classes`` (index = label; "Background" at 0 for COCO datasets whose uncovered
pixels are background), ``stuff_colors``, ``ignore_label``, ``evaluator_type = "lb_sem_seg"``,
``has_ground_truth``, and for COCO datasets ``json_file``, ``image_root``,
``category_id_to_label``, ``draw_order`` and ``uncovered`` (``"background"``: pixels no
annotation covers are the Background class 0; ``"ignore"``: they get ``ignore_label``).
"""

import collections
import logging
import os
import pickle

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..coco.json_file import coco_image_names

__all__ = [
    "EVALUATOR_TYPE",
    "cached_records",
    "dataset_file_names",
    "dataset_images_source",
    "default_palette",
    "file_key",
    "records_by_file_name",
    "register_dataset",
]

logger = logging.getLogger(__name__)

EVALUATOR_TYPE = "lb_sem_seg"

# Datasets whose records stay cached (a train set, a validation set, a pseudo-label set, ...).
_CACHE_SIZE = 8
# Pickled records per loader key, least recently used first.
_RECORD_CACHE = collections.OrderedDict()


def default_palette(num_classes):
    """Distinct colours for ``num_classes`` labels (PASCAL VOC's bit-interleaved colour map:
    label 0 is black)."""
    colors = []
    for label in range(num_classes):
        r = g = b = 0
        value = label
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((r, g, b))
    return colors


def file_key(path):
    """Identifies a file's current content for the cache (path, size, mtime)."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def cached_records(key, load):
    """``load()`` once per process per ``key`` (while it stays among the most recently used
    ``_CACHE_SIZE`` keys); every call returns a fresh copy."""
    if key in _RECORD_CACHE:
        _RECORD_CACHE.move_to_end(key)
    else:
        _RECORD_CACHE[key] = pickle.dumps(load(), protocol=pickle.HIGHEST_PROTOCOL)
        while len(_RECORD_CACHE) > _CACHE_SIZE:
            _RECORD_CACHE.popitem(last=False)
    # the cache holds only pickles this module wrote from records it loaded itself
    return pickle.loads(_RECORD_CACHE[key])


def register_dataset(name, loader, metadata):
    """Register ``name`` (a loader returning records, and its metadata) unless it is already
    registered with the same metadata; a different earlier registration is replaced (with a
    warning)."""
    if name in DatasetCatalog.list():
        current = MetadataCatalog.get(name).as_dict()
        current.pop("name", None)
        if current == metadata:
            return
        logger.warning(f"Dataset {name!r} was registered with other settings; replacing it.")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def dataset_file_names(dataset_name):
    """Image id -> the key that names the image in submissions, probability dumps and label PNGs:
    its ``file_name`` as written in the dataset's COCO json, or for datasets without a json
    (label maps) its path relative to the dataset's ``image_root``."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file", None)
    if json_file is not None:
        return dict(coco_image_names(json_file))
    image_root = MetadataCatalog.get(dataset_name).image_root
    return {
        record["image_id"]: os.path.relpath(record["file_name"], image_root)
        for record in DatasetCatalog.get(dataset_name)
    }


def dataset_images_source(dataset_name):
    """Where the images of any registered dataset are listed, for writers that follow a COCO
    json's images (the pseudo-label writer).

    Returns:
        (json_file, data, uncovered): a dataset with a json (trash, COCO, pseudo-label splits)
        gives its ``json_file`` and ``data=None``; a label-map dataset gives ``json_file=None``
        and ``data``, a COCO dict of its images (``file_name`` = :func:`dataset_file_names`
        key, ``id``, ``height``, ``width``) and of its classes as categories ``0..K-1``.
        ``uncovered`` is the dataset's metadata choice (``"ignore"`` for label maps: every
        label value is a class).
    """
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file", None)
    if json_file is not None:
        return json_file, None, meta.get("uncovered", "background")
    names = dataset_file_names(dataset_name)
    images = [
        {
            "id": record["image_id"],
            "file_name": names[record["image_id"]],
            "height": record["height"],
            "width": record["width"],
        }
        for record in DatasetCatalog.get(dataset_name)
    ]
    categories = [{"id": i, "name": n} for i, n in enumerate(meta.stuff_classes)]
    return None, {"images": images, "categories": categories}, "ignore"


def records_by_file_name(dataset_name):
    """The dataset's records keyed by :func:`dataset_file_names`."""
    names = dataset_file_names(dataset_name)
    return {names[record["image_id"]]: record for record in DatasetCatalog.get(dataset_name)}
