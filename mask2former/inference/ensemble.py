"""Soft-voting ensembles of probability dumps, the models' agreement map, and the post-processing
chain of the competition's final submissions (SPEC 5).

* :class:`SoftVotingEnsemble`: several :class:`~.prob_dump.ProbDumpReader` s with per-model
  weights (normalised to sum 1); checks once that the dumps have the same classes, the same images
  and the same per-image sizes; yields ``(file_name, probs)`` image by image, reading one map per
  dump at a time (memory does not grow with the number of images or of models).
* :func:`agreement_map`: pixels where all (or at least ``min_agree``) models' argmaxes agree, and
  the agreed label.
* :class:`EnsemblePipeline`: soft vote -> optional DenseCRF (:mod:`.crf`, needs the images) ->
  optional agreement overwrite (the first-place team's fix for small objects erased by the CRF)
  -> optional 3x3 mode filter; image by image, optionally in worker processes.
* Outputs besides the existing writers (submission CSV, probability dump): label PNGs
  (:class:`LabelPngWriter`) and the LB-style score of the final labels (:class:`LabelScorer`).
"""
import collections
import concurrent.futures
import os
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from ..data.mode_filter import mode_filter
from ..evaluation import LBSemSegEvaluator
from ..utils import atomic_write
from .batch import json_names_by_id
from .crf import DEFAULT_ITERATIONS, CRFParams, agreement_overwrite, dense_crf, label_dtype
from .prob_dump import ProbDumpReader

__all__ = [
    "EnsemblePipeline",
    "EnsemblePrediction",
    "LabelPngWriter",
    "LabelScorer",
    "SoftVotingEnsemble",
    "agreement_map",
    "argmax_labels",
    "check_min_agree",
    "label_png_path",
    "normalize_weights",
    "soft_vote",
]

_MAX_EXAMPLES = 5


def _examples(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_EXAMPLES else "")


# ------------------------------------------------------------------------------ pure functions


def normalize_weights(weights: Optional[Sequence[float]], num_models: int) -> np.ndarray:
    """Per-model weights divided by their sum (float64); ``None`` means equal weights.

    Raises:
        ValueError: wrong count, or a weight that is not a positive finite number.
    """
    if num_models < 1:
        raise ValueError("an ensemble needs at least one model")
    if weights is None:
        return np.full(num_models, 1.0 / num_models)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_models,):
        raise ValueError(f"{num_models} models but {weights.size} weights {weights.tolist()}")
    if not (np.isfinite(weights) & (weights > 0)).all():
        raise ValueError(f"weights must be positive finite numbers, got {weights.tolist()}")
    return weights / weights.sum()


def soft_vote(prob_maps: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_m weights[m] * prob_maps[m]`` in float32, consuming ``prob_maps`` one at a time.

    ``weights`` are used as given (see :func:`normalize_weights`); there must be one per map.
    """
    weights = list(weights)
    total = None
    count = 0
    for probs, weight in zip(prob_maps, weights):
        weight = np.float32(weight)
        if total is None:
            total = np.multiply(probs, weight, dtype=np.float32)
        else:
            if probs.shape != total.shape:
                raise ValueError(f"probability maps of shapes {total.shape} and {probs.shape}")
            # float32 scalar * float16 / float32 map -> float32, added in place.
            total += np.multiply(probs, weight, dtype=np.float32)
        count += 1
    if count != len(weights):
        raise ValueError(f"{len(weights)} weights but {count} probability maps")
    return total


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    """Argmax over the class axis of [K, H, W] (first class on ties), as uint8 (uint16 beyond
    256 classes)."""
    return probs.argmax(axis=0).astype(label_dtype(probs.shape[0]))


def check_min_agree(min_agree: Optional[int], num_models: int) -> int:
    """``min_agree`` validated against ``num_models`` (None means all models)."""
    if min_agree is None:
        return num_models
    is_int = isinstance(min_agree, (int, np.integer)) and not isinstance(min_agree, bool)
    if not is_int or not 1 <= min_agree <= num_models:
        raise ValueError(f"min_agree must be an integer in [1, {num_models}], got {min_agree!r}")
    return int(min_agree)


def agreement_map(
    label_maps: Sequence[np.ndarray], min_agree: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Where the models agree.

    A pixel agrees when its most frequent label among the M models' labels is unique and given
    by at least ``min_agree`` models (default M: all of them).

    Args:
        label_maps: M label maps H x W (each model's argmax).
        min_agree: 1..M.

    Returns:
        (labels, mask): H x W most frequent label (meaningful where ``mask``; the maps' common
        dtype) and H x W bool agreement mask.
    """
    if len(label_maps) == 0:
        raise ValueError("agreement_map needs at least one label map")
    labels = np.stack([np.asarray(m) for m in label_maps])
    if labels.ndim != 3:
        raise ValueError(f"label maps must be H x W, got shape {labels.shape[1:]}")
    num_models = labels.shape[0]
    min_agree = check_min_agree(min_agree, num_models)
    # votes[m] = number of models whose label equals model m's label (itself included).
    votes = np.zeros(labels.shape, dtype=np.uint16)
    for other in labels:
        votes += labels == other
    top = votes.max(axis=0)
    best = votes.argmax(axis=0)
    agreed = np.take_along_axis(labels, best[None], axis=0)[0]
    # Another label with as many votes: no unique winner.
    rival = ((votes == top) & (labels != agreed)).any(axis=0)
    return agreed, (top >= min_agree) & ~rival


# ------------------------------------------------------------------------------ the ensemble


def _check_same_dumps(readers: Sequence[ProbDumpReader]) -> None:
    """Same classes, same image set, same per-image sizes; errors name the dumps and images."""
    first = readers[0]
    for reader in readers[1:]:
        where = f"probability dump {reader.dump_dir} (compared with {first.dump_dir})"
        if reader.class_names != first.class_names:
            raise ValueError(
                f"{where}: classes differ: {reader.class_names} vs {first.class_names}"
            )
        missing = [n for n in first.file_names if n not in reader]
        extra = [n for n in reader.file_names if n not in first]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} image(s) missing: {_examples(missing)}")
            if extra:
                parts.append(f"{len(extra)} extra image(s): {_examples(extra)}")
            raise ValueError(f"{where}: different images: " + "; ".join(parts))
        sizes = [
            f"{n!r} {reader.size_of(n)} vs {first.size_of(n)}"
            for n in first.file_names
            if reader.size_of(n) != first.size_of(n)
        ]
        if sizes:
            raise ValueError(f"{where}: {len(sizes)} image(s) of different size (H, W): {_examples(sizes)}")


class SoftVotingEnsemble:
    """Weighted soft voting over probability dumps, image by image.

    Example::

        ensemble = SoftVotingEnsemble(["probs_dinat", "probs_semask"], weights=[2, 1])
        for file_name, probs in ensemble:        # [K, H, W] float32, one image at a time
            ...

    Nothing is kept between images: each step reads one map per dump, accumulates the weighted
    sum and yields it.
    """

    def __init__(
        self,
        dumps: Sequence[Union[str, ProbDumpReader]],
        weights: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            dumps: dump folders (written by ``tools/predict.py --probs``) or readers.
            weights: one positive weight per dump (normalised to sum 1); None: equal weights.

        Raises:
            ValueError: the dumps differ in classes, images or image sizes (naming the dumps and
                examples of the images), or bad weights.
        """
        if len(dumps) == 0:
            raise ValueError("an ensemble needs at least one probability dump")
        self.readers: List[ProbDumpReader] = [
            d if isinstance(d, ProbDumpReader) else ProbDumpReader(d) for d in dumps
        ]
        self.weights = normalize_weights(weights, len(self.readers))
        _check_same_dumps(self.readers)
        self.class_names: List[str] = list(self.readers[0].class_names)
        self.file_names: List[str] = list(self.readers[0].file_names)

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def num_models(self) -> int:
        return len(self.readers)

    def description(self) -> str:
        """``"soft vote: <dump> x <weight> + ..."`` (recorded as the model name of a new dump)."""
        terms = [f"{r.dump_dir} x {w:.4g}" for r, w in zip(self.readers, self.weights)]
        return "soft vote: " + " + ".join(terms)

    def check_file_names(self, file_names: Sequence[str], source: str) -> List[str]:
        """Check that ``file_names`` (e.g. a json's images, in its order) are exactly the dumps'
        images; returns them as a list.

        Raises:
            ValueError: naming ``source``, the first dump and examples of the differences.
        """
        file_names = list(file_names)
        duplicates = sorted(n for n, count in collections.Counter(file_names).items() if count > 1)
        if duplicates:
            raise ValueError(f"{source}: file_name(s) listed twice: {_examples(duplicates)}")
        reader = self.readers[0]
        missing = [n for n in file_names if n not in reader]
        extra = sorted(set(self.file_names) - set(file_names))
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} image(s) of {source} are not in the dumps: {_examples(missing)}"
                )
            if extra:
                parts.append(f"{len(extra)} image(s) of the dumps are not in {source}: {_examples(extra)}")
            raise ValueError(f"probability dump {reader.dump_dir}: " + "; ".join(parts))
        return file_names

    def size_of(self, file_name: str) -> Tuple[int, int]:
        """(H, W) of an image of the dumps."""
        size = self.readers[0].size_of(file_name)
        if size is None:
            raise KeyError(f"{file_name} is not in the probability dump {self.readers[0].dump_dir}")
        return size

    def _model_maps(self, file_name: str, model_labels: Optional[list]) -> Iterator[np.ndarray]:
        """Each dump's map of ``file_name`` in turn (shape checked; argmax appended to
        ``model_labels`` when given)."""
        expected = (len(self.class_names), *self.size_of(file_name))
        for reader in self.readers:
            probs = reader.get(file_name, dtype=np.float32)
            if probs.shape != expected:
                raise ValueError(
                    f"probability dump {reader.dump_dir}: {file_name!r} holds an array of shape "
                    f"{probs.shape}, its index says {expected}"
                )
            if model_labels is not None:
                model_labels.append(argmax_labels(probs))
            yield probs

    def vote(self, file_name: str, with_model_labels: bool = False):
        """Soft vote of one image.

        Returns:
            [K, H, W] float32 probabilities; with ``with_model_labels``, also the list of the M
            models' argmax label maps (for :func:`agreement_map`).

        Raises:
            ValueError: a dump's array has the wrong shape or holds NaN / infinite values.
        """
        model_labels = [] if with_model_labels else None
        probs = soft_vote(self._model_maps(file_name, model_labels), self.weights)
        if not np.isfinite(probs).all():
            bad = [r.dump_dir for r in self.readers if not np.isfinite(r.get(file_name)).all()]
            raise ValueError(f"{file_name!r}: NaN or infinite probabilities in the dump(s) {bad}")
        return (probs, model_labels) if with_model_labels else probs

    def iterate(self, file_names: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, np.ndarray]]:
        """Yields ``(file_name, probs)`` for ``file_names`` (default: the first dump's order)."""
        for file_name in self.file_names if file_names is None else file_names:
            yield file_name, self.vote(file_name)

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray]]:
        return self.iterate()


# ------------------------------------------------------------------------------ post-processing


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
       their argmax take that label (:func:`agreement_map`, :func:`~.crf.agreement_overwrite`);
    4. ``apply_mode_filter``: 3x3 mode filter of the labels (:func:`~mask2former.data.mode_filter`).

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
        ``tools/predict.py``), checked against the dumps' size."""
        path = os.path.join(self.image_root, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{file_name!r}: no image {path} (check --image-root)")
        image = np.ascontiguousarray(read_image(path, format="RGB"))
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
            probs = dense_crf(self.read_image(file_name), probs, self.crf_params, self.crf_iterations)
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


# ------------------------------------------------------------------------------ outputs


def label_png_path(out_dir: str, file_name: str) -> str:
    """``out_dir/<file_name without extension>.png``, mirroring the json's sub-folders."""
    norm = os.path.normpath(file_name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError(f"file_name {file_name!r} is not a relative path: cannot place its label PNG")
    return os.path.join(out_dir, os.path.splitext(norm)[0] + ".png")


class LabelPngWriter:
    """Writes each label map as a single-channel PNG (8-bit, 16-bit beyond 256 labels) at
    :func:`label_png_path`, atomically."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written = 0

    def add(self, file_name: str, labels: np.ndarray) -> str:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"{file_name!r}: label map must be H x W uint8 / uint16, got {labels.shape} {labels.dtype}"
            )
        path = label_png_path(self.out_dir, file_name)
        ok, encoded = cv2.imencode(".png", labels)
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {path}")
        with atomic_write(path, "wb") as f:
            f.write(encoded.tobytes())
        self.written += 1
        return path


class LabelScorer:
    """LB-style score of final label maps against a registered COCO dataset's ground truth.

    Runs :class:`~mask2former.evaluation.LBSemSegEvaluator` (the same metrics, logged per-class
    table, ``lb_metrics.json`` and ``confusion_matrix.png`` as ``--eval-only``): each label map is
    handed over as one-hot scores, whose argmax is the label map.
    """

    def __init__(
        self, dataset_name: str, class_names: Sequence[str], output_dir: Optional[str] = None
    ):
        """
        Args:
            dataset_name: registered dataset with a COCO json (metadata ``json_file``) whose
                ``file_name`` s are the dumps' keys.
            class_names: the ensemble's classes; must match the dataset's (case-insensitive).
            output_dir: where ``lb_metrics.json`` / ``confusion_matrix.png`` go (None: nowhere).
        """
        dataset_classes = list(MetadataCatalog.get(dataset_name).stuff_classes)
        if [c.lower() for c in dataset_classes] != [str(c).lower() for c in class_names]:
            raise ValueError(
                f"dataset {dataset_name!r} has classes {dataset_classes}, the probability dumps "
                f"{list(class_names)}: they must be the same, in the same order"
            )
        self.num_classes = len(dataset_classes)
        names_by_id = json_names_by_id(dataset_name)
        self._record_file_names = {
            names_by_id[record["image_id"]]: record["file_name"]
            for record in DatasetCatalog.get(dataset_name)
        }
        self.dataset_name = dataset_name
        self._evaluator = LBSemSegEvaluator(dataset_name, distributed=False, output_dir=output_dir)
        self._evaluator.reset()

    def add(self, file_name: str, labels: np.ndarray) -> None:
        """Score one image (``file_name`` as in the json)."""
        record_file_name = self._record_file_names.get(file_name)
        if record_file_name is None:
            raise KeyError(
                f"{file_name!r} is not an image of dataset {self.dataset_name!r} "
                "(or its validation skipped it)"
            )
        labels = np.asarray(labels)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{file_name!r}: labels must be an H x W integer map, got {labels.shape} {labels.dtype}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{file_name!r}: labels outside [0, {self.num_classes})")
        one_hot = labels[None] == np.arange(self.num_classes, dtype=labels.dtype)[:, None, None]
        scores = torch.from_numpy(one_hot.view(np.uint8))
        self._evaluator.process([{"file_name": record_file_name}], [{"sem_seg": scores}])

    def close(self) -> dict:
        """The metrics (``mIoU``, ``mIoU_per_image``, ``pACC``, ``mACC``, ``fwIoU``,
        ``IoU-<class>``), also logged and written to ``output_dir``."""
        return dict(self._evaluator.evaluate().get("sem_seg", {}))
