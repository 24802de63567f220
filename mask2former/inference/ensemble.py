"""Soft-voting ensembles of probability dumps.

:class:`SoftVotingEnsemble` reads several :class:`~.prob_dump.ProbDumpReader` s with per-model
weights (normalised to sum 1); checks once that the dumps have the same classes, the same images
and the same per-image sizes; yields ``(file_name, probs)`` image by image, reading one map per
dump at a time (memory does not grow with the number of images or of models). The
post-processing chain that follows the vote is :class:`~.pipeline.EnsemblePipeline`.
"""

import collections
import functools
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..postprocess.labels import argmax_labels
from ..postprocess.vote import normalize_weights, soft_vote
from ..utils.io import format_examples
from .prob_dump import ProbDumpReader

__all__ = ["SoftVotingEnsemble"]

# Images named in error messages, in their order, quoted.
_examples = functools.partial(format_examples, sort=False, quote=True)


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
            raise ValueError(
                f"{where}: {len(sizes)} image(s) of different size (H, W): {_examples(sizes)}"
            )


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
                    f"{len(missing)} image(s) of {source} are not in the dumps: "
                    f"{_examples(missing)}"
                )
            if extra:
                parts.append(
                    f"{len(extra)} image(s) of the dumps are not in {source}: {_examples(extra)}"
                )
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

    def iterate(
        self, file_names: Optional[Sequence[str]] = None
    ) -> Iterator[Tuple[str, np.ndarray]]:
        """Yields ``(file_name, probs)`` for ``file_names`` (default: the first dump's order)."""
        for file_name in self.file_names if file_names is None else file_names:
            yield file_name, self.vote(file_name)

    def __iter__(self) -> Iterator[Tuple[str, np.ndarray]]:
        return self.iterate()
