"""Per-pixel class probabilities from a semantic model, with optional test-time augmentation.

The model is any Detectron2 semantic model taking ``[{"image", "height", "width"}]`` and returning
``[{"sem_seg": [K, H, W] scores}]`` at the requested height/width. Mask2Former's semantic scores
(``sum_q softmax(cls_q)[c] * sigmoid(mask_q)``) are not a distribution over classes, so every
prediction is *calibrated* (divided by its per-pixel sum) before test-time augmentations are
averaged: all views then vote with equal weight at every pixel, and the result can be ensembled
with other models as a probability map.
"""
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T

__all__ = ["SemSegPredictor", "calibrate"]


def calibrate(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scores [K, H, W] (non-negative) -> per-pixel probabilities summing to 1."""
    if scores.dim() != 3:
        raise ValueError(f"expected [K, H, W] scores, got shape {tuple(scores.shape)}")
    scores = scores.float().clamp_min(0)
    return scores / scores.sum(dim=0, keepdim=True).clamp_min(eps)


class SemSegPredictor:
    """Runs a semantic model on one image (H x W x 3 uint8 array in ``input_format``).

    Args:
        model: a Detectron2 semantic model (put in eval mode by the predictor).
        test_sizes: shortest-edge sizes; one size = no multi-scale augmentation.
        max_size: longest-edge cap of the resize.
        flip: also run the horizontally flipped image (flipped back before averaging).
        input_format: the channel order the model expects ("RGB" or "BGR").
        batch_size: how many augmented views go through the model at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        test_sizes: Sequence[int] = (512,),
        max_size: int = 2048,
        flip: bool = False,
        input_format: str = "RGB",
        batch_size: int = 1,
    ):
        if not test_sizes:
            raise ValueError("test_sizes must name at least one size")
        self.model = model.eval()
        self.test_sizes = tuple(int(s) for s in test_sizes)
        self.max_size = int(max_size)
        self.flip = bool(flip)
        self.input_format = input_format
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, tta: Optional[bool] = None, batch_size: int = 1):
        """From ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, or ``TEST.AUG.*`` when ``tta``
        (default: ``TEST.AUG.ENABLED``)."""
        tta = cfg.TEST.AUG.ENABLED if tta is None else tta
        if tta:
            return cls(model, test_sizes=cfg.TEST.AUG.MIN_SIZES, max_size=cfg.TEST.AUG.MAX_SIZE,
                       flip=cfg.TEST.AUG.FLIP, input_format=cfg.INPUT.FORMAT, batch_size=batch_size)
        return cls(model, test_sizes=(cfg.INPUT.MIN_SIZE_TEST,), max_size=cfg.INPUT.MAX_SIZE_TEST,
                   flip=False, input_format=cfg.INPUT.FORMAT, batch_size=batch_size)

    def _views(self, image: np.ndarray) -> List[dict]:
        height, width = image.shape[:2]
        views = []
        for size in self.test_sizes:
            resized = T.ResizeShortestEdge(size, self.max_size).get_transform(image).apply_image(image)
            for flipped in (False, True) if self.flip else (False,):
                array = resized[:, ::-1] if flipped else resized
                tensor = torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1)))
                views.append({"image": tensor, "height": height, "width": width, "flipped": flipped})
        return views

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Probabilities [K, H, W] (float32, on the model's device) at the image's size."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        views = self._views(image)
        total = None
        for start in range(0, len(views), self.batch_size):
            chunk = views[start:start + self.batch_size]
            inputs = [{k: v[k] for k in ("image", "height", "width")} for v in chunk]
            for view, output in zip(chunk, self.model(inputs)):
                probs = calibrate(output["sem_seg"])
                if view["flipped"]:
                    probs = probs.flip(-1)
                total = probs if total is None else total.add_(probs)
        return total.div_(len(views))


def iterate_images(records: Iterable[dict], input_format: str):
    """Yields (record, image array) for dataset records, reading with Detectron2's reader
    (EXIF orientation applied, converted to ``input_format``)."""
    from detectron2.data.detection_utils import read_image

    for record in records:
        yield record, read_image(record["file_name"], format=input_format)
