"""Images named by files, globs or folders (no registered dataset, no ground truth) -> sinks.

:func:`collect_image_inputs` turns ``PATH... | GLOB | FOLDER`` into :class:`ImageInput` s: the
file and its key in the outputs (its path relative to the folder it was found in, or the path as
given). :func:`predict_image_inputs` decodes them in data-loader workers (EXIF orientation applied,
RGBA / grayscale / palette images converted, as the dataset loader reads them) and feeds every
image's labels and probabilities to the sinks of :mod:`.sinks`. :class:`BatchSemSegPredictor`
runs several images per forward pass and gives the same probabilities as one image at a time.
"""

import collections
import glob
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from tqdm import tqdm

from ..postprocess.labels import label_dtype
from ..utils.visualize import save_panel
from .predictor import SemSegPredictor, calibrate
from .sinks import LabelPngSink, ProbDumpSink, SubmissionSink, label_png_path, output_png_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "BatchSemSegPredictor",
    "ImageInput",
    "ImageOverlaySink",
    "collect_image_inputs",
    "model_classes",
    "predict_image_files",
    "predict_image_inputs",
    "read_input_image",
]

logger = logging.getLogger(__name__)

# File name endings taken as images (case-insensitive); other files are skipped with a warning.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARACTERS = "*?["


class ImageInput(NamedTuple):
    path: str  # the file to read
    key: str  # its name in the outputs (submission image_id, dump key, label PNG path)


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _candidates(item: str) -> List[Tuple[str, str]]:
    """``(path, key)`` of every file one ``--input`` item names."""
    if os.path.isdir(item):
        found = []
        for root, dirs, files in os.walk(item):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                found.append((path, os.path.relpath(path, item).replace(os.sep, "/")))
        return found
    if os.path.isfile(item):
        return [(item, os.path.normpath(item).replace(os.sep, "/"))]
    if any(c in item for c in _GLOB_CHARACTERS):
        matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"{item}: the pattern matches no file")
        return [(p, os.path.normpath(p).replace(os.sep, "/")) for p in matches]
    raise FileNotFoundError(f"{item}: no such file or folder")


def collect_image_inputs(inputs: Sequence[str]) -> Tuple[List[ImageInput], List[str]]:
    """The images named by ``inputs`` (files, glob patterns, folders searched recursively), in
    the order given (sorted within a folder or pattern), and the skipped files whose names do not
    end in :data:`IMAGE_EXTENSIONS` (logged in one warning).

    Raises ``FileNotFoundError`` for an input that names nothing, ``ValueError`` when two images
    get the same key or no image is found.
    """
    images, skipped, seen = [], [], {}
    for item in inputs:
        for path, key in _candidates(item):
            if not _is_image_name(path):
                skipped.append(path)
                continue
            if key in seen:
                raise ValueError(
                    f"{path} and {seen[key]} would both be named {key!r} in the outputs: "
                    "give them from different folders or rename one"
                )
            seen[key] = path
            images.append(ImageInput(path, key))
    if skipped:
        logger.warning(
            "skipped %d file(s) that are not images (%s): %s",
            len(skipped),
            "/".join(IMAGE_EXTENSIONS),
            ", ".join(skipped),
        )
    if not images:
        raise ValueError(f"no image found in {list(inputs)}")
    return images, skipped


def read_input_image(path: str, input_format: str = "RGB") -> np.ndarray:
    """H x W x 3 uint8 array in ``input_format``, read like the dataset loader (Detectron2's
    reader: EXIF orientation applied, any PIL mode converted). ``ValueError`` naming ``path`` if
    it cannot be decoded."""
    try:
        image = read_image(path, format=input_format)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{path}: decodes to {image.shape} {image.dtype}, not an 8-bit image")
    return np.ascontiguousarray(image)


class _ImageFiles(torch.utils.data.Dataset):
    """``(index, decoded image)`` per :class:`ImageInput` (decoded in data-loader workers)."""

    def __init__(self, images: Sequence[ImageInput], input_format: str):
        self.images = list(images)
        self.input_format = input_format

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return index, read_input_image(self.images[index].path, self.input_format)


class BatchSemSegPredictor(SemSegPredictor):
    """:class:`SemSegPredictor` over several images: views (test sizes, flips) of the same size
    go through the model together, up to ``batch_size`` per forward pass. The model pads a batch
    to its largest image, so only same-size views share a batch: each view is padded exactly as
    when it is alone, and each image's views are averaged in the order of
    :meth:`SemSegPredictor.__call__`."""

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """Probabilities [K, H, W] (float32) of every image, at its size."""
        per_image = []
        by_size = collections.defaultdict(list)  # view size -> [(image index, view index)]
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected H x W x 3 images, got shape {image.shape}")
            views = self._views(image)
            per_image.append(views)
            for j, view in enumerate(views):
                by_size[tuple(view["image"].shape[1:])].append((i, j))
        probs = [[None] * len(views) for views in per_image]
        for members in by_size.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                inputs = [
                    {k: per_image[i][j][k] for k in ("image", "height", "width")} for i, j in chunk
                ]
                for (i, j), output in zip(chunk, self.model(inputs)):
                    view_probs = calibrate(output["sem_seg"])
                    probs[i][j] = view_probs.flip(-1) if per_image[i][j]["flipped"] else view_probs
        results = []
        for views in probs:
            total = views[0].clone()
            for view_probs in views[1:]:
                total.add_(view_probs)
            results.append(total.div_(len(views)))
        return results


class ImageOverlaySink:
    """``image | prediction`` pictures of the first ``max_images`` images, named after their
    keys (``/`` -> ``_``)."""

    def __init__(
        self,
        out_dir: str,
        images: Sequence[ImageInput],
        palette,
        class_names: Sequence[str],
        max_images: int = 8,
    ):
        self.out_dir = out_dir
        self.paths = {image.key: image.path for image in images}
        self.palette = palette
        self.class_names = list(class_names)
        self.max_images = max_images
        self.written: List[str] = []
        os.makedirs(out_dir, exist_ok=True)

    def add(self, file_name: str, labels: np.ndarray, probs=None) -> None:
        if len(self.written) >= self.max_images:
            return
        image = read_input_image(self.paths[file_name], "RGB")
        # out_dir/<key>.png, folders mirrored and the extension kept (no two images clash)
        path = output_png_path(self.out_dir, file_name.lstrip("/"), "overlay")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_panel(path, image, None, np.asarray(labels), self.palette, self.class_names)
        self.written.append(path)

    def close(self) -> List[str]:
        return self.written


def predict_image_inputs(
    predictor: BatchSemSegPredictor,
    images: Sequence[ImageInput],
    sinks: Sequence[object],
    batch_size: int = 1,
    workers: int = 0,
    progress: bool = True,
) -> list:
    """Feed every image's labels (uint8, uint16 beyond 256 classes) and probabilities to every
    sink under its key; returns the sinks' ``close()`` values (only called once every image went
    through, so an interrupted run leaves no submission or dump index).

    Args:
        batch_size: images decoded per step and predicted together (see
            :class:`BatchSemSegPredictor`; its own ``batch_size`` bounds the views per forward).
        workers: data-loader processes decoding the images (0: in this process).
    """
    loader = torch.utils.data.DataLoader(
        _ImageFiles(images, predictor.input_format),
        batch_size=max(1, int(batch_size)),
        num_workers=int(workers),
        collate_fn=list,
    )
    for batch in tqdm(loader, desc="predict images", disable=not progress):
        arrays = [image for _, image in batch]
        for (index, image), probs in zip(batch, predictor.predict_batch(arrays)):
            if probs.shape[1:] != image.shape[:2]:
                raise RuntimeError(
                    f"{images[index].path}: prediction {tuple(probs.shape)} for image {image.shape}"
                )
            labels = probs.argmax(0).cpu().numpy().astype(label_dtype(probs.shape[0]))
            for sink in sinks:
                sink.add(images[index].key, labels, probs)
    return [sink.close() for sink in sinks]


def model_classes(cfg) -> Tuple[List[str], list]:
    """Class names and RGB colours of the dataset ``DATASETS.TEST[0]`` (registered from the
    config by :func:`~mask2former.data.register_datasets_from_cfg`), the classes the model was
    evaluated on. ``ValueError`` if that dataset is not registered or has no class names."""
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: it names the dataset whose classes the model has")
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    classes = meta.get("stuff_classes")
    if classes is None:
        raise ValueError(
            f"DATASETS.TEST[0] = {name!r} is not a registered dataset with class names (set "
            "DATASETS.TRASH_ROOT / COCO_SEMSEG / LABELMAP_SEMSEG, or DATASETS.TEST)"
        )
    colors = meta.get("stuff_colors")
    if colors is None:
        raise ValueError(f"dataset {name!r} has no class colours (stuff_colors)")
    return list(classes), list(colors)


def predict_image_files(
    cfg,
    model: torch.nn.Module,
    inputs: Sequence[str],
    *,
    class_names: Optional[Sequence[str]] = None,
    palette=None,
    submission: Optional[str] = None,
    probs: Optional[str] = None,
    labels: Optional[str] = None,
    overlays: Optional[str] = None,
    num_overlays: int = 8,
    tta: Optional[bool] = None,
    batch_size: int = 1,
    workers: int = 0,
    limit: int = 0,
    model_name: str = "",
    progress: bool = True,
) -> Dict[str, object]:
    """Predict the images named by ``inputs`` (see :func:`collect_image_inputs`) with ``model``
    and write the requested outputs; returns ``{output: what its sink's close() returned}``.

    Args:
        class_names, palette: the model's classes (index = label) and their RGB colours;
            None: those of the dataset ``DATASETS.TEST[0]`` (see :func:`model_classes`).
        submission: submission CSV (``image_id`` = the image's key).
        probs: folder of the float16 probability dump (keys = the images' keys).
        labels: folder of single-channel label PNGs (``<key without extension>.png``).
        overlays: folder of ``image | prediction`` pictures of the first ``num_overlays`` images.
        tta: multi-scale + flip views (``TEST.AUG``); None: ``TEST.AUG.ENABLED``.
        batch_size, workers: see :func:`predict_image_inputs`.
        limit: only the first N images (0: all).
    """
    if not (submission or probs or labels or overlays):
        raise ValueError("nothing to do: give a submission, probs, labels and/or overlays output")
    if class_names is None:
        class_names, default_palette = model_classes(cfg)
        palette = default_palette if palette is None else palette
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(class_names):
        raise ValueError(
            f"the model predicts {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes but "
            f"{len(class_names)} class names were given ({list(class_names)})"
        )
    images, _ = collect_image_inputs(inputs)
    if limit > 0:
        if submission:
            raise ValueError("a limit cannot be combined with a submission (every image is needed)")
        images = images[:limit]
    sinks = {}
    if submission:
        sinks["submission"] = SubmissionSink(submission, [image.key for image in images])
    if probs:
        sinks["probs"] = ProbDumpSink(probs, class_names, model_name=model_name)
    if labels:
        for image in images:  # refuse keys that name no place in the folder before predicting
            label_png_path(labels, image.key)
        sinks["labels"] = LabelPngSink(labels)
    if overlays:
        sinks["overlays"] = ImageOverlaySink(overlays, images, palette, class_names, num_overlays)
    predictor = BatchSemSegPredictor(cfg, model, tta=tta, batch_size=batch_size)
    closed = predict_image_inputs(
        predictor, images, list(sinks.values()), batch_size, workers, progress
    )
    return dict(zip(sinks, closed))
