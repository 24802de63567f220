"""Pseudo-labels from ensemble probabilities: confident pixels -> a training dataset.

Pipeline: per-pixel class probabilities of unlabeled images (one model's dump or a soft-voting
ensemble) -> :func:`pseudo_label_map` (argmax where the max probability reaches the threshold,
the ignore label elsewhere) -> :class:`PseudoLabelWriter` (label PNGs + COCO json + report) ->
:func:`mask2former.data.catalog.pseudo.register_pseudo_label_dataset` (``DATASETS.PSEUDO_LABELS``)
-> train on ``DATASETS.TRAIN ("trash_train", "trash_test_pseudo")``.

Layout of a pseudo-labeled split (built in a hidden temporary folder next to it,
``.tmp_<name>.<pid>.<random>``, renamed into place; a temporary of a killed run is removed by the
next run)::

    OUT/pseudo.json                  COCO json: the source json's images (same ids, file_names,
                                     sizes) + "sem_seg_file_name" (relative to OUT), polygons of
                                     the confident regions, the source json's categories, and a
                                     "pseudo_labels" entry with the settings
    OUT/labels/batch_03/0001.jpg.png uint8 label map (label values of the model, ignore 255),
                                     mirroring the image's file_name, extension kept (no name
                                     collisions; the images themselves are not copied)
    OUT/report.json                  settings and statistics (per-class confident fractions)

Only the label PNGs carry the ignored pixels: a COCO polygon json cannot express an ignore region
(every pixel no polygon covers is background), so the json must be registered with
:mod:`mask2former.data.catalog.pseudo` (records with ``sem_seg_file_name``), never as a plain COCO
dataset. The polygons are there for tools that read COCO polygons (viewers, statistics); they
rasterise back exactly to the non-background confident pixels. The registered records carry no
``annotations``, so the copy-paste bank does not cut objects out of pseudo-labels.
"""

import json
import logging
import os
import shutil
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from ..data.coco import build_category_mapping, check_uncovered, read_coco_json
from ..data.masks.trace import label_map_to_annotations
from ..postprocess.confidence import PseudoLabelStats, pseudo_label_map, threshold_per_class
from ..utils.io import format_examples, make_temporary_directory, replace_directory
from .ensemble import SoftVotingEnsemble
from .sinks import LabelPngSink, label_png_path

__all__ = [
    "PSEUDO_JSON_NAME",
    "REPORT_NAME",
    "PseudoLabelWriter",
    "format_report",
    "pseudo_label_dumps",
]

logger = logging.getLogger(__name__)

PSEUDO_JSON_NAME = "pseudo.json"
REPORT_NAME = "report.json"
LABEL_DIR_NAME = "labels"
# Number of examples shown in error messages and kept in the report.
_MAX_EXAMPLES = 5


# ------------------------------------------------------------------------------ the writer


def _label_path(file_name: str, json_file: str) -> str:
    """``labels/<file_name>.png``, relative to the split's folder, "/"-separated."""
    try:
        path = label_png_path(LABEL_DIR_NAME, file_name)
    except ValueError as e:
        raise ValueError(f"{json_file}: {e}") from e
    return path.replace(os.sep, "/")


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


class PseudoLabelWriter:
    """Streams ``(file_name, probs)`` pairs into a pseudo-labeled split (layout: module docstring).

    Every image of ``source_json`` must be added exactly once (any order; keyed by the json's
    ``file_name``); the json keeps the source's image order. Images without any confident pixel
    are left out of the json (they carry no training signal) and listed in the report. Memory
    does not grow with the number of images beyond one small entry per image: label PNGs are
    written as they come and annotations are streamed to a temporary file.

    Use as a context manager: the folder is renamed into place when the block succeeds and
    removed when it raises (``output_dir`` is then left as it was).
    """

    def __init__(
        self,
        output_dir: str,
        source_json: str,
        class_names: Sequence[str],
        threshold: float,
        *,
        class_thresholds: Optional[Mapping[int, float]] = None,
        min_component: int = 0,
        apply_mode_filter: bool = False,
        ignore_label: int = 255,
        image_root: Optional[str] = None,
        sources: Sequence[str] = (),
        overwrite: bool = False,
        source_data: Optional[dict] = None,
        uncovered: str = "background",
    ):
        """
        Args:
            output_dir (str): the split's folder (must not exist unless ``overwrite``).
            source_json (str): COCO json of the unlabeled images (read only).
            class_names (list[str]): class per label value of the probabilities (index 0 =
                background); must be "Background" + the json's category names in id order.
            threshold, class_thresholds, min_component, apply_mode_filter, ignore_label: see
                :func:`pseudo_label_map`.
            image_root (str or None): folder of the images; when given, every added image must
                exist there.
            sources (list[str]): where the probabilities come from (recorded in the report).
            overwrite (bool): replace an existing ``output_dir`` when the new one is complete.
            source_data (dict or None): the images and categories, as a COCO dict, of a source
                without a json file (a label-map dataset, see
                :func:`~mask2former.data.catalog.common.dataset_images_source`);
                ``source_json`` then only names the source in messages and the report.
            uncovered (str): the source's meaning of label 0: ``"background"`` (``class_names``
                start with Background, which gets no polygon) or ``"ignore"`` (every label is
                a category of the source, in id order); recorded in the json.
        """
        check_uncovered(uncovered, source_json)
        self.uncovered = uncovered
        self.output_dir = os.path.abspath(output_dir)
        self.source_json = os.path.abspath(source_json) if source_data is None else source_json
        self.class_names = list(class_names)
        self.image_root = os.path.abspath(image_root) if image_root else None
        self.settings = {
            "threshold": float(threshold),
            "class_thresholds": {
                str(k): float(v) for k, v in sorted((class_thresholds or {}).items())
            },
            "min_component": int(min_component),
            "mode_filter": bool(apply_mode_filter),
            "ignore_label": int(ignore_label),
        }
        self._label_kwargs = dict(
            threshold=threshold,
            ignore_label=ignore_label,
            min_component=min_component,
            class_thresholds=class_thresholds,
            apply_mode_filter=apply_mode_filter,
        )
        threshold_per_class(len(self.class_names), threshold, class_thresholds)  # validate early
        if not len(self.class_names) <= ignore_label <= 255:
            raise ValueError(
                f"ignore_label must lie in [{len(self.class_names)}, 255], got {ignore_label}"
            )
        self.sources = list(sources)
        self.overwrite = overwrite
        self._check_output_dir()

        data = source_data if source_data is not None else read_coco_json(self.source_json)
        self._categories = data.get("categories", [])
        self._label_to_category = self._label_to_category_ids(self._categories)
        self._licenses = data.get("licenses")
        self._images = data["images"]  # the source's order; annotations are not kept
        self._index: Dict[str, int] = {}
        self._label_paths: Dict[str, str] = {}
        self._index_images()

        self._done = np.zeros(len(self._images), dtype=bool)
        self._kept = np.zeros(len(self._images), dtype=bool)
        self._empty: List[str] = []
        self.num_annotations = 0
        self.stats = PseudoLabelStats(len(self.class_names))
        # Removes the temporaries of killed runs first; normal permissions (umask).
        self._tmp_dir = make_temporary_directory(self.output_dir)
        self._label_pngs = LabelPngSink(os.path.join(self._tmp_dir, LABEL_DIR_NAME))
        self._annotations_file = open(os.path.join(self._tmp_dir, ".annotations.jsonl"), "w")
        self._closed = False

    def _check_output_dir(self):
        if os.path.exists(self.output_dir) and not self.overwrite:
            raise FileExistsError(f"{self.output_dir} exists (pass overwrite to replace it)")
        json_file = self.source_json if os.path.isfile(self.source_json) else None
        for what, path in (("source json", json_file), ("image root", self.image_root)):
            if path and _is_inside(path, self.output_dir):
                raise ValueError(f"the output folder {self.output_dir} contains the {what} {path}")

    def _label_to_category_ids(self, categories) -> Dict[int, int]:
        mapping = build_category_mapping(categories, self.source_json, uncovered=self.uncovered)
        first = 1 if self.uncovered == "background" else 0
        json_names = mapping.class_names[first:]
        if [n.lower() for n in json_names] != [str(n).lower() for n in self.class_names[first:]]:
            raise ValueError(
                f"{self.source_json}: categories {json_names} (in id order) do not match the "
                f"probabilities' classes {self.class_names[first:]}"
                + (" (after background)" if first else "")
            )
        return {
            label: cid
            for cid, label in mapping.category_id_to_label.items()
            if label != 0 or not first
        }

    def _index_images(self):
        problems, by_label_path, ids = [], {}, set()
        for i, img in enumerate(self._images):
            if not isinstance(img, dict) or not all(
                k in img for k in ("id", "file_name", "height", "width")
            ):
                problems.append(f"image entry {i} lacks id / file_name / height / width")
                continue
            name = img["file_name"]
            if img["id"] in ids:
                problems.append(f"image id {img['id']} appears twice")
            ids.add(img["id"])
            if name in self._index:
                problems.append(f"file_name {name!r} appears twice")
                continue
            label_path = _label_path(name, self.source_json)
            if label_path in by_label_path:
                problems.append(
                    f"{name!r} and {by_label_path[label_path]!r} would share the label file "
                    f"{label_path}"
                )
            by_label_path[label_path] = name
            self._index[name] = i
            self._label_paths[name] = label_path
        if problems:
            raise ValueError(
                f"{self.source_json}: {len(problems)} problem(s): "
                f"{format_examples(problems, _MAX_EXAMPLES, sort=False)}"
            )
        if not self._images:
            raise ValueError(f"{self.source_json}: no images")

    @property
    def file_names(self) -> List[str]:
        """The source json's image ``file_name`` in json order (what :meth:`add` expects)."""
        return [img["file_name"] for img in self._images]

    def add(self, file_name: str, probs) -> None:
        """Pseudo-label one image. ``probs``: [K, H, W] at the json's image size."""
        i = self._index.get(file_name)
        if i is None:
            raise KeyError(f"{file_name} is not an image of {self.source_json}")
        if self._done[i]:
            raise ValueError(f"{file_name}: added twice")
        img = self._images[i]
        probs = np.asarray(probs)
        expected = (len(self.class_names), img["height"], img["width"])
        if probs.shape != expected:
            raise ValueError(
                f"{file_name}: probabilities of shape {probs.shape}, expected {expected} (K, H, W)"
            )
        if self.image_root and not os.path.isfile(os.path.join(self.image_root, file_name)):
            raise FileNotFoundError(
                f"{file_name}: no image {os.path.join(self.image_root, file_name)}"
            )
        try:
            label = pseudo_label_map(probs, stats=self.stats, **self._label_kwargs)
        except ValueError as e:
            raise ValueError(f"{file_name}: {e}") from e
        self._done[i] = True
        ignore = self.settings["ignore_label"]
        if not (label != ignore).any():
            self._empty.append(file_name)
            return
        self._label_pngs.add(file_name, label)
        background = 0 if self.uncovered == "background" else None
        for ann in label_map_to_annotations(label, ignore_label=ignore, background=background):
            self.num_annotations += 1
            ann.update(
                id=self.num_annotations,
                image_id=img["id"],
                category_id=self._label_to_category[ann["category_id"]],
            )
            self._annotations_file.write(json.dumps(ann) + "\n")
        self._kept[i] = True

    def _write_json(self, path: str):
        """The COCO json, annotations streamed from the temporary file."""
        images = [
            dict(img, sem_seg_file_name=self._label_paths[img["file_name"]])
            for img, kept in zip(self._images, self._kept)
            if kept
        ]
        head = {
            "info": {"description": f"pseudo-labels of {self.source_json}"},
            "pseudo_labels": dict(
                self.settings,
                source_json=self.source_json,
                sources=self.sources,
                uncovered=self.uncovered,
            ),
            "images": images,
            "categories": self._categories,
        }
        if self._licenses is not None:
            head["licenses"] = self._licenses
        self._annotations_file.close()
        with open(path, "w") as out, open(self._annotations_file.name) as anns:
            out.write(json.dumps(head)[:-1] + ', "annotations": [')
            for n, line in enumerate(anns):
                out.write(("," if n else "") + line.rstrip("\n"))
            out.write("]}")
        os.remove(self._annotations_file.name)

    def report(self) -> dict:
        """Settings and statistics (what ``report.json`` holds)."""
        return {
            "output_dir": self.output_dir,
            "source_json": self.source_json,
            "image_root": self.image_root,
            "sources": self.sources,
            "settings": self.settings,
            "images_in_json": int(self._kept.sum()),
            "images_without_confident_pixels": len(self._empty),
            "examples_without_confident_pixels": self._empty[:_MAX_EXAMPLES],
            "annotations": self.num_annotations,
            "stats": self.stats.as_dict(self.class_names),
        }

    def close(self) -> dict:
        """Check completeness, write the json and the report, move the folder into place.
        Returns :meth:`report`."""
        if self._closed:
            raise RuntimeError("PseudoLabelWriter closed twice")
        missing = [img["file_name"] for img, done in zip(self._images, self._done) if not done]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) of {self.source_json} were never added: "
                f"{format_examples(missing, _MAX_EXAMPLES, sort=False)}"
            )
        if not self._kept.any():
            raise ValueError(
                f"no confident pixel in any of the {len(self._images)} images of "
                f"{self.source_json}: "
                f"lower the threshold ({self.settings['threshold']})"
            )
        self._label_pngs.close()
        self._write_json(os.path.join(self._tmp_dir, PSEUDO_JSON_NAME))
        report = self.report()
        with open(os.path.join(self._tmp_dir, REPORT_NAME), "w") as f:
            json.dump(report, f, indent=1)
        replace_directory(self._tmp_dir, self.output_dir, self.overwrite)
        self._closed = True
        logger.info(
            "pseudo-labels of %d images (%d without confident pixels left out) written to %s",
            report["images_in_json"],
            report["images_without_confident_pixels"],
            self.output_dir,
        )
        return report

    def abort(self) -> None:
        """Remove the temporary folder (``output_dir`` is untouched)."""
        if not self._annotations_file.closed:
            self._annotations_file.close()
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and not self._closed:
                self.close()
        finally:
            if os.path.isdir(self._tmp_dir):
                self.abort()
        return False


def pseudo_label_dumps(
    dumps: Sequence[str],
    output_dir: str,
    source_json: str,
    *,
    weights: Optional[Sequence[float]] = None,
    progress: bool = True,
    **writer_kwargs,
) -> dict:
    """Soft-vote the probability dumps image by image into a pseudo-labeled split.

    Args:
        dumps: probability dump folders (one model each; several are soft-voted).
        output_dir, source_json: see :class:`PseudoLabelWriter`.
        weights: one weight per dump (None: equal).
        writer_kwargs: ``threshold`` and the keyword arguments of :class:`PseudoLabelWriter`.

    Returns:
        the report (what ``report.json`` holds).
    """
    ensemble = SoftVotingEnsemble(dumps, weights)
    threshold = writer_kwargs.pop("threshold")
    writer = PseudoLabelWriter(
        output_dir,
        source_json,
        ensemble.class_names,
        threshold,
        sources=[ensemble.description()],
        **writer_kwargs,
    )
    with writer:
        file_names = ensemble.check_file_names(writer.file_names, source_json)
        votes = ensemble.iterate(file_names)
        for file_name, probs in tqdm(
            votes, total=len(file_names), desc="pseudo-labels", disable=not progress
        ):
            writer.add(file_name, probs)
        return writer.close()


def format_report(report: dict, name: str, json_path: str, image_root: str) -> str:
    """The per-class statistics of a report as a table, its totals, and the config overrides
    that train on train + the pseudo-labeled split ``name``."""
    stats = report["stats"]
    rows = [
        [c["label"], c["name"], c["predicted_pixels"], c["pseudo_pixels"], c["confident_fraction"]]
        for c in stats["per_class"]
    ]
    table = tabulate(
        rows,
        headers=["label", "class", "argmax px", "pseudo px", "confident"],
        tablefmt="pipe",
        floatfmt=".3f",
        missingval="-",
    )
    entry = [[name, json_path, image_root]]
    return (
        f"{table}\n"
        f"\n{report['images_in_json']} images in {json_path} "
        f"({report['images_without_confident_pixels']} without confident pixels left out), "
        f"{report['annotations']} polygons; confident pixels: {stats['confident_fraction']:.3f} "
        f"({stats['removed_small_components']} small components removed)\n"
        "\nTrain on train + pseudo-labels with the config overrides:\n"
        f"    DATASETS.PSEUDO_LABELS \"{entry}\" DATASETS.TRAIN \"('trash_train', '{name}')\""
    )
