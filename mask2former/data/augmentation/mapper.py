"""Train-time dataset mapper for mask-classification semantic segmentation.

``MaskFormerSemanticDatasetMapper`` has the name, config keys and outputs of the official
Mask2Former mapper, and also accepts COCO-polygon records: the ground-truth label map is built by
:func:`~.rasterize.record_to_label_map` (polygons painted in ``DATASETS.POLYGON_DRAW_ORDER``)
*before* the geometric augmentations, so every augmentation sees a label map.

Inference needs no project mapper: Detectron2's ``DatasetMapper(cfg, is_train=False)`` reads
and resizes the image and drops the annotations; the evaluator rebuilds the ground truth from the
dataset record with ``record_to_label_map``.

Copy-paste seam: the mapper takes an optional ``copy_paste`` object with one method,
``maybe_sample(record, rng) -> record``, called on every record before the image is read. It
may return the record unchanged or substitute another one (e.g. an image of the copy-paste bank
with its annotations); it must not modify either, as the mapper maps a copy of the record
returned (a sampler may return the same cached bank record many times). ``rng`` is a
``numpy.random.Generator`` private to the current process, derived from NumPy's global seed
(which Detectron2 seeds per data-loader worker).
"""

import copy
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ..coco.images import UnreadableImageError, read_image_file
from ..masks.rasterize import DRAW_ORDERS, record_to_label_map
from .color import ColorAugSSDLookupTransform
from .resize_crop import ResizeShortestEdgeCrop

__all__ = ["MaskFormerSemanticDatasetMapper"]

logger = logging.getLogger(__name__)

# Pixel value of image padding (as the official mapper).
_IMAGE_PAD_VALUE = 128
# Records kept per process as replacements of unreadable images (without fallback_records), and
# draws of a replacement before giving up.
_MAX_READ_RECORDS = 1000
_MAX_DRAWS = 100
# Label values up to this (exclusive) are listed by counting pixels per value.
_MAX_COUNTED_LABEL = 2**16


def _copy_record(record):
    """A copy of ``record`` to map: deep, but for its annotations (by far its largest part, a
    list of polygons), which the mapper only reads to build the label map and then drops."""
    copied = copy.deepcopy({k: v for k, v in record.items() if k != "annotations"})
    if "annotations" in record:
        copied["annotations"] = record["annotations"]
    return copied


class MaskFormerSemanticDatasetMapper:
    """Map a dataset record to the training inputs of MaskFormer / Mask2Former.

    Output dict: ``image`` (uint8 tensor C x H x W in ``INPUT.FORMAT``), ``sem_seg`` (int64
    H x W, padding = ignore label), ``instances`` (``gt_classes`` int64 [N] and ``gt_masks`` bool
    [N, H, W]: one mask per class present, the ignore label excluded), plus the record's
    ``file_name``, ``image_id``, ``height``, ``width``.
    """

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        ignore_label,
        size_divisibility,
        draw_order="area_desc",
        copy_paste=None,
        unreadable_image="error",
        fallback_records=None,
    ):
        """
        Args:
            is_train: must be True (use Detectron2's ``DatasetMapper`` for inference).
            augmentations (list[Augmentation or Transform]): applied in order.
            image_format (str): ``read_image`` format, e.g. "RGB" or "BGR".
            ignore_label (int): label of ignored pixels (padding value of the target).
            size_divisibility (int): pad image and target to a multiple of this (<= 0: no
                padding in the mapper).
            draw_order (str): polygon draw order (see :mod:`.rasterize`).
            copy_paste: None or an object with ``maybe_sample(record, rng) -> record``.
            unreadable_image (str): an image file that cannot be decoded (truncated, corrupt):
                "error" stops with its path; "skip" warns once per file and maps another
                record instead, drawn from ``fallback_records``.
            fallback_records (list[dict] or None): records an unreadable image is replaced by
                under "skip" (the training records); None: the records this process has read
                before (an unreadable first image is then an error).
        """
        if not is_train:
            raise ValueError(
                "MaskFormerSemanticDatasetMapper is a training mapper; use "
                "detectron2.data.DatasetMapper(cfg, is_train=False) for inference."
            )
        if unreadable_image not in ("skip", "error"):
            raise ValueError(
                f"unreadable_image must be 'skip' or 'error', got {unreadable_image!r}"
            )
        if draw_order not in DRAW_ORDERS:
            raise ValueError(f"draw_order must be one of {DRAW_ORDERS}, got {draw_order!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.draw_order = draw_order
        self.copy_paste = copy_paste
        self.unreadable_image = unreadable_image
        self.fallback_records = fallback_records
        self._skipped_files = set()  # unreadable images skipped by this process
        self._read_records = []  # records read by this process (fallbacks without a list)
        self._rng_pid = None
        self._rng_generator = None
        logger.info(f"[{self.__class__.__name__}] Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True, copy_paste=None, fallback_records=None):
        resize = T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN,
            cfg.INPUT.MAX_SIZE_TRAIN,
            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        )
        augs = [resize]
        if cfg.INPUT.CROP.ENABLED:
            crop = T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
            # the same draws as the resize then the crop; only the crop window is resampled
            augs = [ResizeShortestEdgeCrop(resize, crop)]
        if cfg.INPUT.COLOR_AUG_SSD:
            augs.append(ColorAugSSDLookupTransform(img_format=cfg.INPUT.FORMAT))
        augs.append(T.RandomFlip())
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "draw_order": cfg.DATASETS.POLYGON_DRAW_ORDER,
            "copy_paste": copy_paste,
            "unreadable_image": cfg.DATASETS.VALIDATION.UNREADABLE_IMAGE,
            "fallback_records": fallback_records,
        }

    def _rng(self):
        """A Generator private to this process (data-loader workers are forked copies)."""
        if self._rng_pid != os.getpid():
            self._rng_pid = os.getpid()
            self._rng_generator = np.random.default_rng(np.random.randint(2**31))
        return self._rng_generator

    def _pad(self, image, sem_seg):
        """Pad bottom/right to a multiple of ``size_divisibility``."""
        h, w = sem_seg.shape
        pad_h, pad_w = -h % self.size_divisibility, -w % self.size_divisibility
        if pad_h == 0 and pad_w == 0:
            return image, sem_seg
        padding = [0, pad_w, 0, pad_h]
        image = F.pad(image, padding, value=_IMAGE_PAD_VALUE).contiguous()
        sem_seg = F.pad(sem_seg, padding, value=self.ignore_label).contiguous()
        return image, sem_seg

    def _instances(self, sem_seg):
        """One binary mask per class present (ignore label excluded)."""
        instances = Instances(tuple(sem_seg.shape))
        # The labels present, ascending: counted when they are those of a uint8 / uint16 label
        # map (20x faster than torch.unique, which sorts), else (32-bit TIFFs) torch.unique.
        low, high = torch.aminmax(sem_seg) if sem_seg.numel() else (0, 0)
        if 0 <= low and high < _MAX_COUNTED_LABEL:
            classes = torch.bincount(sem_seg.flatten()).nonzero().flatten()
        else:
            classes = torch.unique(sem_seg)
        classes = classes[classes != self.ignore_label]
        instances.gt_classes = classes.to(torch.int64)
        instances.gt_masks = sem_seg[None] == classes[:, None, None]
        return instances

    def _replacement(self, error):
        """Apply the ``unreadable_image`` policy to a decode failure: raise, or return another
        record (not known to be unreadable) to map instead."""
        if self.unreadable_image == "error":
            raise UnreadableImageError(
                error.path,
                f"{error.reason}; set DATASETS.VALIDATION.VERIFY_IMAGES True to find every such "
                "file at registration, or DATASETS.VALIDATION.UNREADABLE_IMAGE skip",
            ) from error
        if error.path not in self._skipped_files:
            self._skipped_files.add(error.path)
            logger.warning(
                "%s; skipped, another image is drawn (%d unreadable image(s) skipped by this "
                "process)",
                error,
                len(self._skipped_files),
            )
        pool = self._read_records if self.fallback_records is None else self.fallback_records
        rng = self._rng()
        for _ in range(_MAX_DRAWS):
            if not pool:
                break
            record = pool[int(rng.integers(len(pool)))]
            if record["file_name"] not in self._skipped_files:
                return record
        raise UnreadableImageError(
            error.path,
            f"{error.reason}; no readable image to draw instead "
            f"({len(self._skipped_files)} unreadable image(s) skipped by this process)",
        ) from error

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): a dataset record (COCO polygons or ``sem_seg_file_name``).

        Returns:
            dict: see the class docstring (of a replacement record when the image cannot be
            decoded and ``unreadable_image`` is "skip").
        """
        record = dataset_dict
        if self.copy_paste is not None:
            dataset_dict = self.copy_paste.maybe_sample(record, self._rng())
        # The record mapped is copied, never modified: it belongs to the dataset or to the
        # copy-paste sampler, which hands out the same bank records again.
        dataset_dict = _copy_record(dataset_dict)
        try:
            image = read_image_file(dataset_dict["file_name"], format=self.image_format)
        except UnreadableImageError as e:
            return self(self._replacement(e))
        if self.fallback_records is None and len(self._read_records) < _MAX_READ_RECORDS:
            self._read_records.append(record)
        utils.check_image_size(dataset_dict, image)
        sem_seg = record_to_label_map(dataset_dict, self.draw_order)
        if sem_seg.shape != image.shape[:2]:
            raise ValueError(
                f"{dataset_dict.get('sem_seg_file_name', dataset_dict['file_name'])}: label map "
                f"of size {sem_seg.shape} for an image of size {image.shape[:2]}"
            )
        if sem_seg.dtype != np.uint8:
            # Detectron2 resizes non-uint8 arrays with torch, which needs floating point.
            sem_seg = sem_seg.astype(np.float64)

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        if self.size_divisibility > 0:
            image, sem_seg = self._pad(image, sem_seg)

        dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = self._instances(sem_seg)
        return dataset_dict
