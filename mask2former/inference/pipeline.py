"""The post-processing chain of the competition's final submissions, after the soft vote:
DenseCRF (needs the images) -> agreement overwrite (the first-place team's fix for small objects
erased by the CRF) -> 3x3 mode filter; image by image, optionally in worker processes.
"""

import collections
import concurrent.futures
import os
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ..data.coco.images import read_image_file
from ..postprocess.agreement import agreement_map, agreement_overwrite, check_min_agree
from ..postprocess.crf import DEFAULT_ITERATIONS, CRFParams, dense_crf
from ..postprocess.labels import argmax_labels
from ..postprocess.mode_filter import mode_filter
from .ensemble import SoftVotingEnsemble

__all__ = ["EnsemblePipeline", "EnsemblePrediction"]


class EnsemblePrediction(NamedTuple):
    """Result of :meth:`EnsemblePipeline.predict` for one image."""

    file_name: str
    probs: Optional[np.ndarray]  # [K, H, W] float32: soft vote, or CRF marginals with CRF
    labels: np.ndarray  # H x W final labels (uint8 up to 256 classes)


class EnsemblePipeline:
    """Soft vote -> DenseCRF -> agreement overwrite -> mode filter, image by image.

    Each step but the vote is optional:

    1. soft vote of the dumps (:class:`SoftVotingEnsemble`);
    2. ``crf_params``: DenseCRF of the vote on the image ``image_root/file_name`` (the dumps'
       keys are the json ``file_name`` s); labels = argmax of the CRF marginals;
    3. ``agreement``: pixels where at least ``min_agree`` of the models (default: all) agree on
       their argmax take that label (:func:`~mask2former.postprocess.agreement_map`,
       :func:`~mask2former.postprocess.agreement_overwrite`);
    4. ``apply_mode_filter``: 3x3 mode filter of the labels
       (:func:`~mask2former.postprocess.mode_filter`).

    ``probs`` of a prediction are the vote's (after CRF: the CRF marginals); steps 3 and 4 change
    only the labels.
    """

    def __init__(
        self,
        ensemble: SoftVotingEnsemble,
        *,
        crf_params: Optional[CRFParams] = None,
        crf_iterations: int = DEFAULT_ITERATIONS,
        agreement: bool = False,
        min_agree: Optional[int] = None,
        apply_mode_filter: bool = False,
        image_root: Optional[str] = None,
        keep_probs: bool = True,
    ):
        """
        Args:
            ensemble: the dumps and weights.
            crf_params: DenseCRF kernels (e.g. ``CRF_PRESETS["default"]``); None: no CRF.
            crf_iterations: mean-field iterations.
            agreement: overwrite the labels where the models agree.
            min_agree: models that must agree (1..M; default M).
            apply_mode_filter: 3x3 mode filter of the final labels.
            image_root: folder of the images (required with CRF).
            keep_probs: return the probabilities (False: ``probs`` is None, which spares moving
                them between processes when only labels are written).
        """
        if crf_params is not None and image_root is None:
            raise ValueError("DenseCRF needs the images: give image_root")
        if min_agree is not None and not agreement:
            raise ValueError("min_agree is only used with agreement")
        if agreement:
            check_min_agree(min_agree, ensemble.num_models)
        self.ensemble = ensemble
        self.crf_params = crf_params
        self.crf_iterations = crf_iterations
        self.agreement = agreement
        self.min_agree = min_agree
        self.apply_mode_filter = apply_mode_filter
        self.image_root = image_root
        self.keep_probs = keep_probs

    def read_image(self, file_name: str) -> np.ndarray:
        """The RGB uint8 image of a dump key (C-contiguous, EXIF orientation applied like
        ``tools/predict.py``), checked against the dumps' size.

        Raises:
            FileNotFoundError, UnreadableImageError: naming the image file.
        """
        path = os.path.join(self.image_root, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{file_name!r}: no image {path} (check --image-root)")
        image = np.ascontiguousarray(read_image_file(path, format="RGB"))
        size = self.ensemble.size_of(file_name)
        if image.shape[:2] != size:
            raise ValueError(
                f"{path}: image is {image.shape[0]}x{image.shape[1]} but the probabilities of "
                f"{file_name!r} are {size[0]}x{size[1]}"
            )
        return image

    def predict(self, file_name: str) -> EnsemblePrediction:
        """All steps for one image."""
        if self.agreement:
            probs, model_labels = self.ensemble.vote(file_name, with_model_labels=True)
        else:
            probs = self.ensemble.vote(file_name)
        if self.crf_params is not None:
            probs = dense_crf(
                self.read_image(file_name), probs, self.crf_params, self.crf_iterations
            )
        labels = argmax_labels(probs)
        if self.agreement:
            agreed, mask = agreement_map(model_labels, self.min_agree)
            labels = agreement_overwrite(labels, agreed, mask)
        if self.apply_mode_filter:
            labels = mode_filter(labels)
        return EnsemblePrediction(file_name, probs if self.keep_probs else None, labels)

    def predictions(
        self, file_names: Optional[Sequence[str]] = None, workers: int = 1
    ) -> Iterator[EnsemblePrediction]:
        """:meth:`predict` for every image, in order (default: the first dump's order).

        With ``workers > 1`` the images are processed by that many worker processes (DenseCRF
        runs in C++ on one core per image); at most ``2 * workers`` images are in flight, so
        memory stays bounded.
        """
        file_names = self.ensemble.file_names if file_names is None else file_names
        if workers <= 1:
            for file_name in file_names:
                yield self.predict(file_name)
            return
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=(self,)
        ) as pool:
            pending = collections.deque()
            for file_name in file_names:
                pending.append(pool.submit(_predict_in_worker, file_name))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


# The pipeline of a worker process, set once by the pool's initializer (not sent per image).
_WORKER_PIPELINE: Optional[EnsemblePipeline] = None


def _init_worker(pipeline: EnsemblePipeline) -> None:
    global _WORKER_PIPELINE
    _WORKER_PIPELINE = pipeline


def _predict_in_worker(file_name: str) -> EnsemblePrediction:
    return _WORKER_PIPELINE.predict(file_name)
