"""Registration of label-map datasets: images and single-channel PNG label maps paired by file
stem.

Records: ``{"file_name", "height", "width", "image_id": file stem, "sem_seg_file_name"}``.
"""

import functools
import os

from PIL import Image

from ...utils.io import format_examples
from .common import EVALUATOR_TYPE, cached_records, default_palette, file_key, register_dataset

__all__ = ["IMAGE_EXTENSIONS", "load_labelmap_records", "register_labelmap_semseg"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _list_by_stem(folder, extensions):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No such folder: {folder}")
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() not in extensions:
            continue
        if stem in files:
            raise ValueError(
                f"{folder}: two files with the stem {stem!r}: {files[stem]} and {entry}"
            )
        files[stem] = entry
    return files


def load_labelmap_records(image_dir, label_dir):
    """Records pairing ``image_dir/<stem>.<image ext>`` with ``label_dir/<stem>.png``.

    Raises:
        ValueError: unpaired files (with examples) or an image whose size differs from its label.
    """
    images = _list_by_stem(image_dir, IMAGE_EXTENSIONS)
    labels = _list_by_stem(label_dir, (".png",))
    problems = []
    unlabeled, unpaired_labels = images.keys() - labels.keys(), labels.keys() - images.keys()
    if unlabeled:
        problems.append(f"images without a label in {label_dir}: {format_examples(unlabeled)}")
    if unpaired_labels:
        problems.append(
            f"labels without an image in {image_dir}: {format_examples(unpaired_labels)}"
        )
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
                raise ValueError(
                    f"{label_file}: label size {lab.size} differs from image size {size} of "
                    f"{file_name}"
                )
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
    key = ("labelmap", file_key(image_dir), file_key(label_dir))
    return cached_records(key, functools.partial(load_labelmap_records, image_dir, label_dir))


def register_labelmap_semseg(
    name, image_dir, label_dir, class_names, ignore_label=255, class_colors=None
):
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
