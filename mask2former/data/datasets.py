"""Dataset registration: the trash competition format, any COCO-polygon json, label-map PNGs.

Registration is cheap and idempotent; records are loaded (and COCO jsons validated, see
:mod:`.coco_validation`) the first time ``DatasetCatalog.get`` is called, then cached per process
(as a pickle: every call returns a fresh copy that callers may modify).

Records (Detectron2 conventions):

* COCO polygons: ``{"file_name": absolute path, "height", "width", "image_id": json id,
  "annotations": [{"segmentation": [[x1, y1, ...], ...], "category_id": label 1..K, "area",
  "bbox", "bbox_mode", "iscrowd", "id"}, ...]}`` (test splits: ``"annotations": []``).
* label maps: ``{"file_name", "height", "width", "image_id": file stem, "sem_seg_file_name"}``.

Metadata: ``stuff_classes`` (index = label, "Background" at 0 for COCO datasets),
``stuff_colors``, ``ignore_label``, ``evaluator_type = "lb_sem_seg"``, ``has_ground_truth``, and
for COCO datasets ``json_file``, ``image_root``, ``category_id_to_label``, ``draw_order``.
"""
import functools
import logging
import os
import pickle

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .coco_validation import ValidationPolicy, load_coco_semseg_json, read_coco_categories
from .rasterize import DRAW_ORDERS

__all__ = [
    "TRASH_CLASSES",
    "TRASH_COLORS",
    "TRASH_SPLITS",
    "default_palette",
    "load_labelmap_records",
    "register_coco_semseg",
    "register_labelmap_semseg",
    "register_trash_dataset",
]

logger = logging.getLogger(__name__)

EVALUATOR_TYPE = "lb_sem_seg"

# SPEC 3.1: label value = category id, background 0.
TRASH_CLASSES = (
    "Background",
    "General trash",
    "Paper",
    "Paper pack",
    "Metal",
    "Glass",
    "Plastic",
    "Styrofoam",
    "Plastic bag",
    "Battery",
    "Clothing",
)
TRASH_COLORS = (
    (0, 0, 0),
    (192, 0, 128),
    (0, 128, 192),
    (0, 128, 64),
    (128, 0, 0),
    (64, 0, 128),
    (64, 0, 192),
    (192, 128, 64),
    (192, 192, 128),
    (64, 64, 128),
    (128, 0, 192),
)
TRASH_SPLITS = ("train_all", "train", "val", "test")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Pickled records per loader key; see _cached.
_RECORD_CACHE = {}


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


def _file_key(path):
    """Identifies a file's current content for the cache (path, size, mtime)."""
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _cached(key, load):
    """``load()`` once per process per ``key``; every call returns a fresh copy."""
    if key not in _RECORD_CACHE:
        _RECORD_CACHE[key] = pickle.dumps(load(), protocol=pickle.HIGHEST_PROTOCOL)
    return pickle.loads(_RECORD_CACHE[key])


def _load_coco(json_file, image_root, policy, category_id_to_label):
    key = ("coco", _file_key(json_file), os.path.abspath(image_root), policy,
           tuple(sorted((category_id_to_label or {}).items())))

    def load():
        data = load_coco_semseg_json(json_file, image_root, policy, category_id_to_label)
        logger.info(f"Loaded {len(data.records)} images from {json_file}")
        return data.records

    return _cached(key, load)


def register_dataset(name, loader, metadata):
    """Register ``name`` (a loader returning records, and its metadata) unless it is already registered with the same metadata; a different
    earlier registration is replaced (with a warning)."""
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


def register_coco_semseg(
    name,
    json_file,
    image_root,
    cfg_validation=None,
    *,
    category_id_to_label=None,
    class_names=None,
    class_colors=None,
    ignore_label=255,
    draw_order="area_desc",
):
    """Register a COCO-polygon json as a semantic-segmentation dataset.

    Args:
        name (str): dataset name.
        json_file (str): COCO json (read once here for its categories).
        image_root (str): folder the images' ``file_name`` are relative to.
        cfg_validation: ``cfg.DATASETS.VALIDATION`` (CfgNode / dict / ValidationPolicy / None).
        category_id_to_label (dict or None): fixed json id -> label mapping; default maps the
            json's categories to 1..K in id order (background-named categories to 0).
        class_names, class_colors: per label (index 0 = background); defaults from the json's
            category names and :func:`default_palette`. Required with ``category_id_to_label``.
        ignore_label (int): label of ignored pixels (only produced by padding / label maps).
        draw_order (str): polygon draw order, see :mod:`.rasterize`.
    """
    if draw_order not in DRAW_ORDERS:
        raise ValueError(f"draw_order must be one of {DRAW_ORDERS}, got {draw_order!r}")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Dataset {name!r}: no json file {json_file}")
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    policy = ValidationPolicy.from_cfg(cfg_validation)
    mapping, has_ground_truth = read_coco_categories(json_file, category_id_to_label)
    if category_id_to_label is None:
        class_names = list(class_names or mapping.class_names)
    elif class_names is None:
        raise ValueError(f"Dataset {name!r}: class_names are required with category_id_to_label")
    class_colors = [tuple(c) for c in (class_colors or default_palette(len(class_names)))]
    if len(class_colors) != len(class_names):
        raise ValueError(f"Dataset {name!r}: {len(class_names)} classes but {len(class_colors)} colours")
    loader = functools.partial(_load_coco, json_file, image_root, policy, category_id_to_label)
    metadata = dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=EVALUATOR_TYPE,
        stuff_classes=list(class_names),
        stuff_colors=class_colors,
        ignore_label=ignore_label,
        category_id_to_label=dict(mapping.category_id_to_label),
        draw_order=draw_order,
        has_ground_truth=has_ground_truth,
    )
    register_dataset(name, loader, metadata)


def register_trash_dataset(root, prefix="trash", cfg_validation=None, *, draw_order="area_desc", ignore_label=255):
    """Register the competition splits found in ``root`` (SPEC 3.1).

    ``{prefix}_train_all``, ``{prefix}_train``, ``{prefix}_val`` and ``{prefix}_test`` are
    registered for each of ``train_all.json``, ``train.json``, ``val.json``, ``test.json`` that
    exists; image ``file_name`` are relative to ``root``. Classes and palette are the fixed 11 of
    the competition (label = category id).

    Returns:
        list[str]: the registered names.
    """
    root = os.path.abspath(root)
    names = []
    for split in TRASH_SPLITS:
        json_file = os.path.join(root, f"{split}.json")
        if not os.path.isfile(json_file):
            continue
        name = f"{prefix}_{split}"
        register_coco_semseg(
            name,
            json_file,
            root,
            cfg_validation,
            category_id_to_label={i: i for i in range(1, len(TRASH_CLASSES))},
            class_names=TRASH_CLASSES,
            class_colors=TRASH_COLORS,
            ignore_label=ignore_label,
            draw_order=draw_order,
        )
        names.append(name)
    if not names:
        logger.warning(f"No {'/'.join(TRASH_SPLITS)} json found in {root}: nothing registered.")
    return names


def _list_by_stem(folder, extensions):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No such folder: {folder}")
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() not in extensions:
            continue
        if stem in files:
            raise ValueError(f"{folder}: two files with the stem {stem!r}: {files[stem]} and {entry}")
        files[stem] = entry
    return files


def format_examples(items, n=5, sort=True):
    """Up to ``n`` of ``items`` for an error message: "a, b, c, ... (N in all)"."""
    items = sorted(items) if sort else list(items)
    return ", ".join(str(i) for i in items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_labelmap_records(image_dir, label_dir):
    """Records pairing ``image_dir/<stem>.<image ext>`` with ``label_dir/<stem>.png``.

    Raises:
        ValueError: unpaired files (with examples) or an image whose size differs from its label.
    """
    images = _list_by_stem(image_dir, IMAGE_EXTENSIONS)
    labels = _list_by_stem(label_dir, (".png",))
    problems = []
    if images.keys() - labels.keys():
        problems.append(f"images without a label in {label_dir}: {format_examples(images.keys() - labels.keys())}")
    if labels.keys() - images.keys():
        problems.append(f"labels without an image in {image_dir}: {format_examples(labels.keys() - images.keys())}")
    if problems:
        raise ValueError("Unpaired label-map dataset files:\n  " + "\n  ".join(problems))
    if not images:
        raise ValueError(f"No images found in {image_dir}")
    records = []
    for stem in sorted(images):
        file_name = os.path.join(image_dir, images[stem])
        label_file = os.path.join(label_dir, labels[stem])
        with Image.open(file_name) as img:
            size = img.size
        with Image.open(label_file) as lab:
            if lab.size != size:
                raise ValueError(f"{label_file}: label size {lab.size} differs from image size {size} of {file_name}")
        records.append(
            {
                "file_name": file_name,
                "height": size[1],
                "width": size[0],
                "image_id": stem,
                "sem_seg_file_name": label_file,
            }
        )
    return records


def _load_labelmap(image_dir, label_dir):
    key = ("labelmap", _file_key(image_dir), _file_key(label_dir))
    return _cached(key, functools.partial(load_labelmap_records, image_dir, label_dir))


def register_labelmap_semseg(name, image_dir, label_dir, class_names, ignore_label=255, class_colors=None):
    """Register a label-map dataset: images in ``image_dir``, single-channel PNG label maps with
    the same stem in ``label_dir`` (values = class index, ``ignore_label`` ignored)."""
    image_dir, label_dir = os.path.abspath(image_dir), os.path.abspath(label_dir)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Dataset {name!r}: no folder {folder}")
    class_colors = [tuple(c) for c in (class_colors or default_palette(len(class_names)))]
    metadata = dict(
        image_root=image_dir,
        sem_seg_root=label_dir,
        evaluator_type=EVALUATOR_TYPE,
        stuff_classes=list(class_names),
        stuff_colors=class_colors,
        ignore_label=ignore_label,
        has_ground_truth=True,
    )
    register_dataset(name, functools.partial(_load_labelmap, image_dir, label_dir), metadata)
