"""Per-pixel class probabilities from a semantic model, with optional test-time augmentation.

The model is any Detectron2 semantic model taking ``[{"image", "height", "width"}]`` and returning
``[{"sem_seg": [K, H, W] scores}]`` at the requested height/width. Mask2Former's semantic scores
(``sum_q softmax(cls_q)[c] * sigmoid(mask_q)``) are not a distribution over classes, so every
prediction is *calibrated* (divided by its per-pixel sum) before test-time augmentations are
averaged: all views then vote with equal weight at every pixel, and the result can be ensembled
with other models as a probability map.
"""

import logging
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from tqdm import tqdm

from ..data.coco.images import read_image_file
from ..postprocess.labels import label_dtype
from .sinks import Prediction, write_predictions

__all__ = [
    "PredictorAsModel",
    "SemSegPredictor",
    "calibrate",
    "iterate_images",
    "predict_records",
    "tta_sizes_off_training_scale",
    "warn_if_tta_off_training_scale",
]

logger = logging.getLogger(__name__)

# A test-time short side more than this factor above the largest (or below the smallest)
# training short side shows objects at scales the model has not been trained on.
TTA_SCALE_TOLERANCE = 1.5


def tta_sizes_off_training_scale(
    test_sizes: Sequence[int], train_sizes: Sequence[int], tolerance: float = TTA_SCALE_TOLERANCE
) -> List[int]:
    """The test short sides more than ``tolerance`` times above the largest or below the
    smallest training short side (``INPUT.MIN_SIZE_TRAIN``, "choice" or "range" alike)."""
    low, high = min(train_sizes) / tolerance, max(train_sizes) * tolerance
    return [int(s) for s in test_sizes if not low <= s <= high]


def warn_if_tta_off_training_scale(cfg) -> None:
    """Log a warning naming the ``TEST.AUG.MIN_SIZES`` off the training scale, if any."""
    train = cfg.INPUT.MIN_SIZE_TRAIN
    off_scale = tta_sizes_off_training_scale(cfg.TEST.AUG.MIN_SIZES, train)
    if off_scale:
        logger.warning(
            "TTA: TEST.AUG.MIN_SIZES %s are more than %.1fx away from the training short sides "
            "INPUT.MIN_SIZE_TRAIN %d..%d: those views show objects at scales the model was not "
            "trained on and usually lower the score. Set TEST.AUG.MIN_SIZES around "
            "INPUT.MIN_SIZE_TEST (%d), e.g. 0.75x to 1.5x.",
            off_scale,
            TTA_SCALE_TOLERANCE,
            min(train),
            max(train),
            cfg.INPUT.MIN_SIZE_TEST,
        )


def calibrate(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scores [K, H, W] (non-negative) -> per-pixel probabilities summing to 1."""
    if scores.dim() != 3:
        raise ValueError(f"expected [K, H, W] scores, got shape {tuple(scores.shape)}")
    scores = scores.float().clamp_min(0)
    return scores / scores.sum(dim=0, keepdim=True).clamp_min(eps)


class SemSegPredictor:
    """Runs a semantic model on one image (H x W x 3 uint8 array in ``input_format``).

    Built from a config with ``SemSegPredictor(cfg, model, tta=None, batch_size=1)`` (see
    :meth:`from_config`) or from explicit arguments:

    Args:
        model: a Detectron2 semantic model (put in eval mode by the predictor).
        test_sizes: shortest-edge sizes; one size = no multi-scale augmentation.
        max_size: longest-edge cap of the resize.
        flip: also run the horizontally flipped image (flipped back before averaging).
        input_format: the channel order the model expects ("RGB" or "BGR").
        batch_size: how many augmented views go through the model at once.
    """

    @configurable
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
    def from_config(
        cls, cfg, model: torch.nn.Module, tta: Optional[bool] = None, batch_size: int = 1
    ):
        """From ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, or ``TEST.AUG.*`` when ``tta``
        (default: ``TEST.AUG.ENABLED``)."""
        tta = cfg.TEST.AUG.ENABLED if tta is None else tta
        if tta:
            sizes, max_size, flip = cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP
            warn_if_tta_off_training_scale(cfg)
        else:
            sizes, max_size, flip = (cfg.INPUT.MIN_SIZE_TEST,), cfg.INPUT.MAX_SIZE_TEST, False
        return {
            "model": model,
            "test_sizes": sizes,
            "max_size": max_size,
            "flip": flip,
            "input_format": cfg.INPUT.FORMAT,
            "batch_size": batch_size,
        }

    def _views(self, image: np.ndarray) -> List[dict]:
        height, width = image.shape[:2]
        views = []
        for size in self.test_sizes:
            resized = (
                T.ResizeShortestEdge(size, self.max_size).get_transform(image).apply_image(image)
            )
            for flipped in (False, True) if self.flip else (False,):
                array = resized[:, ::-1] if flipped else resized
                tensor = torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1)))
                views.append(
                    {"image": tensor, "height": height, "width": width, "flipped": flipped}
                )
        return views

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Probabilities [K, H, W] (float32, on the model's device) at the image's size."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        views = self._views(image)
        total = None
        for start in range(0, len(views), self.batch_size):
            chunk = views[start : start + self.batch_size]
            inputs = [{k: v[k] for k in ("image", "height", "width")} for v in chunk]
            for view, output in zip(chunk, self.model(inputs)):
                probs = calibrate(output["sem_seg"])
                if view["flipped"]:
                    probs = probs.flip(-1)
                total = probs if total is None else total.add_(probs)
        return total.div_(len(views))


def iterate_images(records: Iterable[dict], input_format: str):
    """Yields (record, image array) for dataset records, reading with Detectron2's reader
    (EXIF orientation applied, converted to ``input_format``); an image that cannot be decoded
    raises an error naming its file."""
    for record in records:
        yield record, read_image_file(record["file_name"], format=input_format)


def predict_records(
    predictor: SemSegPredictor,
    records: Sequence[dict],
    file_names: Mapping[object, str],
    sinks: Sequence[object],
    input_format: str = "RGB",
    progress: bool = True,
    description: str = "predict",
) -> list:
    """Feed every record's labels and probabilities to every sink (:mod:`.sinks`); returns the
    sinks' ``close()`` values.

    Args:
        file_names: image id -> the key the sinks know the image by
            (:func:`~mask2former.data.catalog.common.dataset_file_names`).

    Sinks are closed only when every image went through; a failed or interrupted run aborts them,
    so their outputs keep their previous content (:func:`~.sinks.write_predictions`).
    """
    iterator = tqdm(
        iterate_images(records, input_format),
        total=len(records),
        desc=description,
        disable=not progress,
    )

    def predictions():
        for record, image in iterator:
            probs = predictor(image)
            if probs.shape[1:] != image.shape[:2]:
                raise RuntimeError(
                    f"{record['file_name']}: prediction {tuple(probs.shape)} for image "
                    f"{image.shape}"
                )
            labels = probs.argmax(0).cpu().numpy().astype(label_dtype(probs.shape[0]))
            yield Prediction(file_names[record["image_id"]], labels, probs)

    results = write_predictions(predictions(), dict(enumerate(sinks)))
    return [results[i] for i in range(len(sinks))]


class PredictorAsModel(torch.nn.Module):
    """A :class:`SemSegPredictor` behind the Detectron2 model interface, for
    ``inference_on_dataset`` and the evaluators: ``[{"file_name", ...}]`` ->
    ``[{"sem_seg": probabilities [K, H, W]}]``.

    Each image is read again from its ``file_name`` at its original size (the predictor resizes
    every view itself), exactly as :func:`predict_records` reads it, so a Detectron2 evaluation
    scores the same predictions as ``tools/predict.py``; the ``"image"`` a test mapper made is
    not used.
    """

    def __init__(self, predictor: SemSegPredictor, input_format: str = "RGB"):
        super().__init__()
        self.predictor = predictor
        self.model = predictor.model  # a submodule, so that eval() / train() reach it
        self.input_format = input_format

    def forward(self, inputs: Sequence[dict]) -> List[dict]:
        if self.training:
            raise RuntimeError("PredictorAsModel is for inference only")
        outputs = []
        for record in inputs:
            image = read_image_file(record["file_name"], format=self.input_format)
            outputs.append({"sem_seg": self.predictor(image)})
        return outputs
