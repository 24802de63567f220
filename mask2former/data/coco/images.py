"""Image files as the json describes them and as ``read_image`` returns them: header checks,
EXIF orientation, decoding with errors that name the file, and the transform that brings
annotations into the displayed frame."""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from detectron2.data.detection_utils import read_image
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_util

__all__ = [
    "ImageFileInfo",
    "ImageGeometry",
    "UnreadableImageError",
    "exif_points_to_displayed",
    "inspect_image_file",
    "read_image_file",
]

# What PIL raises for a truncated, corrupt or unknown image file.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)


class UnreadableImageError(OSError):
    """An image file that exists but cannot be decoded (truncated, corrupt, not an image).

    ``path`` is the file, ``reason`` what the decoder said."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: cannot decode the image ({reason})")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable between processes (worker pools)
        return type(self), (self.path, self.reason)


def read_image_file(path, format=None):
    """``detectron2.data.detection_utils.read_image`` (EXIF orientation applied), with decode
    failures raised as :class:`UnreadableImageError` naming the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnreadableImageError: the file is truncated, corrupt or not an image.
    """
    try:
        return read_image(path, format=format)
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


_EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class ImageFileInfo:
    """What the header of an image file says. ``size`` is (width, height) after the EXIF
    orientation (what ``detectron2.data.detection_utils.read_image`` returns)."""

    raw_size: Tuple[int, int] = (0, 0)
    orientation: int = 1
    mode: str = ""
    error: Optional[str] = None

    @property
    def size(self):
        w, h = self.raw_size
        return (h, w) if self.orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


def inspect_image_file(path, verify=False):
    """Read an image header (lazy PIL open); with ``verify`` also decode it fully, which finds
    truncated and corrupt files. Never raises for a bad file: ``error`` says what is wrong."""
    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            info = ImageFileInfo(tuple(img.size), orientation, img.mode)
            if verify:
                img.load()
    except _DECODE_ERRORS as e:
        return ImageFileInfo(error=f"{type(e).__name__}: {e}")
    if info.orientation not in range(1, 9):
        info.orientation = 1  # read_image ignores invalid orientation values too
    return info


# ---------------------------------------------------------------------------------- geometry


def exif_points_to_displayed(x, y, orientation, raw_w, raw_h):
    """Map raw-frame coordinates of a transposing EXIF orientation (5..8: the only ones whose
    raw and displayed sizes differ, so the only ones a size check can detect) to the displayed
    frame (PIL's ``exif_transpose``, as applied by ``read_image``)."""
    if orientation == 5:
        return y, x
    if orientation == 6:
        return raw_h - y, x
    if orientation == 7:
        return raw_h - y, raw_w - x
    if orientation == 8:
        return y, raw_w - x
    raise ValueError(f"not a transposing EXIF orientation: {orientation}")


@dataclass
class ImageGeometry:
    """How annotations of one image must be transformed to match the image read from disk."""

    width: int
    height: int
    orientation: int = 1  # EXIF orientation (5..8) to apply to the annotations (raw -> displayed)
    raw_size: Tuple[int, int] = (0, 0)
    scale: Tuple[float, float] = (1.0, 1.0)

    def transform(self, xy):
        if self.orientation != 1:
            x, y = exif_points_to_displayed(xy[:, 0], xy[:, 1], self.orientation, *self.raw_size)
            xy = np.stack([x, y], axis=1)
        if self.scale != (1.0, 1.0):
            xy = xy * np.asarray(self.scale)
        return xy

    @property
    def identity(self):
        return self.orientation == 1 and self.scale == (1.0, 1.0)

    def transform_rle(self, rle):
        mask = mask_util.decode(rle)
        if self.orientation != 1:
            img = Image.fromarray(mask)
            img = img.transpose(_PIL_EXIF_TRANSPOSE[self.orientation])
            mask = np.asarray(img)
        if self.scale != (1.0, 1.0):
            mask = np.asarray(
                Image.fromarray(mask).resize((self.width, self.height), Image.NEAREST)
            )
        return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


_PIL_EXIF_TRANSPOSE = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
