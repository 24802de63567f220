"""Multi-scale resize followed by a crop, applied to the image as one resampling of the crop.

Detectron2 applies ``ResizeShortestEdge`` and then the crop augmentation one after the other:
the whole image is resized (up to 1280 px on the short side in the multi-scale configs, 2.5x the
pixels of a 512x512 photo on average over 320..1280) and then all but the crop is thrown away.
:class:`ResizeShortestEdgeCrop` draws the same random size and crop window, from the same
random-number calls in the same order, and resamples only the crop window of the image: PIL's
resize with a source ``box`` evaluates the same bilinear filter at the same source positions, so
the result equals the crop of the full resize up to the rounding of the filter coefficients (at
most 2 of 255, on about 0.5 % of pixels). The label map is resized in full with nearest
neighbour and cropped, exactly as before (it is a single uint8 channel and cheap).
"""

from typing import Optional

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform, Transform
from PIL import Image

__all__ = ["ResizeShortestEdgeCrop", "ResizedCropTransform"]


class ResizedCropTransform(Transform):
    """A :class:`~detectron2.data.transforms.ResizeTransform` followed by a ``CropTransform``
    (in resized coordinates). uint8 images of 1 or 3 channels are resampled over the crop
    window only (see the module docstring); other images and label maps are resized in full and
    cropped, as the two transforms would."""

    def __init__(self, resize: T.ResizeTransform, crop: CropTransform):
        super().__init__()
        self.resize = resize
        self.crop = crop

    def _source_box(self):
        """The crop window in source pixel coordinates (left, top, right, bottom)."""
        sx, sy = self.resize.w / self.resize.new_w, self.resize.h / self.resize.new_h
        c = self.crop
        return (c.x0 * sx, c.y0 * sy, (c.x0 + c.w) * sx, (c.y0 + c.h) * sy)

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        interp = self.resize.interp if interp is None else interp
        channels = 1 if img.ndim == 2 else img.shape[2]
        if img.dtype != np.uint8 or channels not in (1, 3) or interp == Image.NEAREST:
            return self.crop.apply_image(self.resize.apply_image(img, interp))
        if img.shape[:2] != (self.resize.h, self.resize.w):
            raise ValueError(
                f"image of size {img.shape[:2]} for a resize from {(self.resize.h, self.resize.w)}"
            )
        pil = Image.fromarray(img[:, :, 0] if img.ndim == 3 and channels == 1 else img)
        out = np.asarray(pil.resize((self.crop.w, self.crop.h), interp, box=self._source_box()))
        return out[:, :, None] if img.ndim == 3 and channels == 1 else out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.crop.apply_segmentation(self.resize.apply_segmentation(segmentation))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return self.crop.apply_coords(self.resize.apply_coords(coords))


class ResizeShortestEdgeCrop(T.Augmentation):
    """``resize`` (Detectron2's ``ResizeShortestEdge``) then ``crop`` (an augmentation whose
    ``get_transform(image, sem_seg)`` reads only the image's shape and the label map, as
    ``RandomCrop_CategoryAreaConstraint`` and ``RandomCrop``), with the random draws of the two
    applied one after the other, returned as one :class:`ResizedCropTransform`."""

    def __init__(self, resize: T.ResizeShortestEdge, crop: T.Augmentation):
        super().__init__()
        self.resize = resize
        self.crop = crop

    def get_transform(self, image: np.ndarray, sem_seg: Optional[np.ndarray] = None) -> Transform:
        resize = self.resize.get_transform(image)
        if isinstance(resize, NoOpTransform):
            return T.TransformList([resize, self._crop_transform(image, sem_seg)])
        # the label map is resized for the crop's draw only when the crop reads it (it is
        # resized again, with the image, when the transform is applied)
        resized_seg = None
        if sem_seg is not None and self._crop_reads_labels():
            resized_seg = resize.apply_segmentation(sem_seg)
        # the crop draws from the resized size only: a zero-stride stand-in for the image
        resized_image = np.broadcast_to(np.zeros((), image.dtype), (resize.new_h, resize.new_w))
        crop = self._crop_transform(resized_image, resized_seg)
        if not isinstance(crop, CropTransform):
            return T.TransformList([resize, crop])
        return ResizedCropTransform(resize, crop)

    def _crop_reads_labels(self) -> bool:
        """False for a category-area crop without a constraint (it reads the image's shape
        only, as ``RandomCrop``); True otherwise."""
        crop = self.crop
        if isinstance(crop, T.RandomCrop_CategoryAreaConstraint):
            return crop.single_category_max_area < 1.0
        return not isinstance(crop, T.RandomCrop)

    def _crop_transform(self, image, sem_seg) -> Transform:
        if isinstance(self.crop, T.RandomCrop):  # reads the image's shape only
            return self.crop.get_transform(image)
        return self.crop.get_transform(image, sem_seg)

    def __repr__(self) -> str:
        return f"ResizeShortestEdgeCrop(resize={self.resize!r}, crop={self.crop!r})"
