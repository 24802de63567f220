"""The competition loop on a label-map data root (``train/`` and ``val/``, each with
``images/`` and ``labels/``), driven through the project's tools as subprocesses.

Main path (``budget_iters`` per model): label maps -> COCO polygon jsons
(``datasets/labelmap_to_coco.py``) -> model A (Swin, multi-scale jitter) and model B (another
architecture, other seed) trained by ``train_net.py`` -> val score single and with TTA, each with
a probability dump (``tools/predict.py --probs``) -> soft-voting ensemble of the TTA dumps, + each
DenseCRF preset, + agreement overwrite, + mode filter (``tools/ensemble.py``) -> pseudo-labels
of the val images (``tools/pseudo_label.py``) -> model A retrained on train + pseudo-labels with
``DATALOADER.FILTER_EMPTY_ANNOTATIONS True`` and ``IGNORE_IN_MASK_LOSS`` on / off, scored again.

Ablations (``ablation_iters`` per model, model A's config, each against model A at that budget):
Swin init official / trunc_normal with two seeds each, multi-scale jitter off, copy-paste bank
on, EMA on, inverse-sqrt-frequency class weights.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..postprocess.crf import CRF_PRESETS
from ..utils.io import atomic_write, write_json
from .report import collect_rows, format_table
from .steps import Step, StepRunner

logger = logging.getLogger(__name__)

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_UNLABELLED",
    "STEP_GROUPS",
    "LoopSettings",
    "build_loop",
    "numbered_classes",
    "run_loop",
]

# Step groups, in loop order (``LoopSettings.steps`` selects some).
STEP_GROUPS = ("convert", "models", "ensemble", "pseudo", "ablations")
RARE_CLASSES = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
# CamVid's classes by label value (0..10) and its "Unlabelled" value (ignored, not a class).
CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip
CAMVID_UNLABELLED = 11
SPLITS = ("train", "val")


@dataclass
class LoopSettings:
    """Everything the loop needs; paths may be relative to ``repo_root``.

    Attributes:
        data_root: folder with ``train/`` and ``val/`` (``images/`` + ``labels/`` each).
        output: the loop's folder (reused on a rerun: complete steps are skipped).
        class_names: name of each label value (the label PNGs hold class ids).
        ignore_label: label value that is never trained or scored.
        background_label: label value that is a background class (pixels no polygon covers);
            None: every label value is a class and uncovered pixels are ignored.
        config_a / config_b: the two models' configs (B must differ in architecture).
        seed_a / seed_b: their seeds.
        budget_iters: iterations of models A, B and the retrained models.
        ablation_iters: iterations of every ablation model.
        min_size_test: short side of the test images; training jitters around it by
            ``jitter_scales`` (the TTA uses ``tta_scales``).
        crop: training crop side.
        steps: the step groups to run (see ``STEP_GROUPS``).
        pseudo_threshold: minimum soft-vote probability of a pseudo-labelled pixel.
        extra_opts: config overrides ``[KEY, VALUE, ...]`` of every model.
        ensemble_workers: worker processes of ``tools/ensemble.py``.
        tta: also score (and dump) models A and B with TTA; the ensemble then votes the TTA
            dumps.
        crf_presets: DenseCRF presets of the CRF rows (None: every preset); the first one
            is used by the agreement rows.
        all_ensemble_rows: plain soft vote, one row per CRF preset, and the mode filter row;
            False: only the vote + CRF + agreement overwrite row.
        pseudo_ignore_in_mask: the ``IGNORE_IN_MASK_LOSS`` values of the retrained models.
        jobs: steps run side by side at most (those that do not depend on each other, e.g.
            the trainings of A and B); each gets CPU cores // jobs threads.
        repo_root: working directory of the tools (the repository root).
    """

    data_root: str
    output: str
    class_names: Sequence[str]
    ignore_label: int = 255
    background_label: Optional[int] = None
    config_a: str = "configs/tiny/camvid_small_cpu.yaml"
    config_b: str = "configs/tiny/camvid_semask_cpu.yaml"
    seed_a: int = 1
    seed_b: int = 2
    budget_iters: int = 1371
    ablation_iters: int = 400
    min_size_test: int = 180
    crop: int = 160
    jitter_scales: Tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2)
    tta_scales: Tuple[float, ...] = (0.75, 1.0, 1.25)
    steps: Sequence[str] = STEP_GROUPS
    pseudo_threshold: float = 0.9
    extra_opts: List[str] = field(default_factory=list)
    ensemble_workers: int = 2
    tta: bool = True
    crf_presets: Optional[Sequence[str]] = None
    all_ensemble_rows: bool = True
    pseudo_ignore_in_mask: Sequence[bool] = (True, False)
    jobs: int = 1
    repo_root: str = "."

    def __post_init__(self):
        unknown = sorted(set(self.steps) - set(STEP_GROUPS))
        if unknown:
            raise ValueError(f"unknown step groups {unknown}; choose from {list(STEP_GROUPS)}")
        for split in SPLITS:
            for sub in ("images", "labels"):
                path = os.path.join(self.data_root, split, sub)
                if not os.path.isdir(path):
                    raise FileNotFoundError(
                        f"{path} is missing: the data root needs train/ and val/, each with "
                        "images/ and labels/ (label PNGs of class ids, same stems as the images)"
                    )
        if self.background_label is not None and not (
            0 <= self.background_label < len(self.class_names)
        ):
            raise ValueError(
                f"background_label {self.background_label} is not a label value of the "
                f"{len(self.class_names)} classes"
            )
        self.data_root = os.path.abspath(self.data_root)
        self.output = os.path.abspath(self.output)


def numbered_classes(data_root: str, ignore_label: int) -> List[str]:
    """Class names "0".."K" where K is the largest label value (other than ``ignore_label``)
    in the label PNGs of ``data_root``'s train and val splits."""
    largest = -1
    for split in SPLITS:
        label_dir = os.path.join(data_root, split, "labels")
        for name in sorted(os.listdir(label_dir)):
            if not name.lower().endswith(".png"):
                continue
            path = os.path.join(label_dir, name)
            with Image.open(path) as image:
                if image.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(
                        f"{path}: label maps are single-channel, got mode {image.mode}"
                    )
                values = np.unique(np.asarray(image))
            values = values[values != ignore_label]
            if values.size:
                largest = max(largest, int(values.max()))
    if largest < 0:
        raise ValueError(f"no labelled pixel in the label maps of {data_root}")
    return [str(i) for i in range(largest + 1)]


class _Loop:
    """Builds the steps and the table rows of one loop."""

    def __init__(self, s: LoopSettings):
        self.s = s
        self.out = s.output
        self.steps: List[Step] = []
        # (group, row name, score json, reference row name or None, steps that produced it)
        self.rows: List[Tuple[str, str, str, Optional[str], List[str]]] = []

    # ---------------------------------------------------------------- paths and config
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def json_of(self, split: str) -> str:
        return self.path("data", f"{split}.json")

    def images_of(self, split: str) -> str:
        return os.path.join(self.s.data_root, split, "images")

    def num_images(self, split: str) -> int:
        return len(os.listdir(self.images_of(split)))

    def num_classes(self) -> int:
        return len(self.s.class_names)

    def dataset_opts(self) -> List[str]:
        """Overrides registering loop_train / loop_val from the converted jsons (every tool)."""
        entries = []
        for split in SPLITS:
            entry = [f"loop_{split}", self.json_of(split), self.images_of(split)]
            if self.s.background_label is None:
                entry.append("ignore")  # pixels no annotation covers are ignored
            entries.append(entry)
        min_test = self.s.min_size_test
        tta = tuple(int(round(min_test * f)) for f in self.s.tta_scales)
        return [
            "DATASETS.TRASH_ROOT", "",
            "DATASETS.LABELMAP_SEMSEG", "[]",
            "DATASETS.COCO_SEMSEG", repr(entries),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(self.num_classes()),
            "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", str(self.s.ignore_label),
            "INPUT.MIN_SIZE_TEST", str(min_test),
            "TEST.AUG.MIN_SIZES", repr(tta),
            "TEST.AUG.MAX_SIZE", str(4 * max(tta)),
            "TEST.AUG.FLIP", "True",
        ]  # fmt: skip

    def jitter(self, on: bool) -> str:
        scales = self.s.jitter_scales if on else (1.0,)
        return repr(tuple(int(round(self.s.min_size_test * f)) for f in scales))

    # ---------------------------------------------------------------- steps
    def add(self, group: str, step: Step) -> Step:
        if group in self.s.steps:
            self.steps.append(step)
        return step

    def convert(self):
        background = self.s.background_label
        for split in SPLITS:
            cmd = [
                "python", "datasets/labelmap_to_coco.py",
                "--labels", os.path.join(self.s.data_root, split, "labels"),
                "--images", self.images_of(split),
                "--output", self.json_of(split),
                "--ignore-label", str(self.s.ignore_label),
                "--class-names", *self.s.class_names,
            ]  # fmt: skip
            if background is None:
                cmd.append("--no-background")
            else:
                cmd += ["--background", str(background)]
            cost = 0.3 * self.num_images(split)
            self.add("convert", Step(f"convert_{split}", cmd, [self.json_of(split)], cost=cost))

    def train(self, group, name, config, seed, iters, opts=(), train_sets=("loop_train",)):
        out_dir = self.path("models", name)
        cmd = [
            "python", "train_net.py", "--config-file", config, "--resume",
            *self.dataset_opts(),
            "OUTPUT_DIR", out_dir,
            "SEED", str(seed),
            "SOLVER.MAX_ITER", str(iters),
            "SOLVER.WARMUP_ITERS", str(min(50, max(1, iters // 5))),
            "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // 4)),
            "DATASETS.TRAIN", repr(tuple(train_sets)),
            "DATASETS.TEST", "()",
            "TEST.EVAL_PERIOD", "0",
            "INPUT.MIN_SIZE_TRAIN", self.jitter(True),
            "INPUT.CROP.SIZE", repr((self.s.crop, self.s.crop)),
            *self.s.extra_opts,
            *opts,
        ]  # fmt: skip
        # --resume continues an interrupted training from its last checkpoint
        self.add(
            group,
            Step(f"train_{name}", cmd, [os.path.join(out_dir, "model_final.pth")], cost=30 + iters),
        )
        return out_dir

    def predict(self, group, name, config, weights, tta=False, probs=True):
        score_dir = self.path("scores", name)
        dump = self.path("probs", name)
        cmd = [
            "python", "tools/predict.py", "--config-file", config, "--weights", weights,
            "--dataset", "loop_val", "--score", "--score-dir", score_dir,
        ]  # fmt: skip
        artefacts, outputs = [os.path.join(score_dir, "lb_metrics.json")], [score_dir]
        if probs:
            cmd += ["--probs", dump]
            artefacts.append(os.path.join(dump, "index.json"))
            outputs.append(dump)
        if tta:
            cmd.append("--tta")
        cmd += [*self.dataset_opts(), *self.s.extra_opts]
        cost = 20 + 0.2 * self.num_images("val") * (2 * len(self.s.tta_scales) if tta else 1)
        step = self.add(group, Step(f"predict_{name}", cmd, artefacts, outputs, cost=cost))
        return step, artefacts[0], dump

    def row(self, group, name, score, reference, step_names):
        self.rows.append((group, name, score, reference, step_names))

    def model(self, group, name, config, seed, iters, opts=(), reference=None, tta=True):
        out_dir = self.train(group, name, config, seed, iters, opts)
        weights = os.path.join(out_dir, "model_final.pth")
        _, score, dump = self.predict(group, name, config, weights)
        self.row(group, name, score, reference, [f"train_{name}", f"predict_{name}"])
        if tta:
            _, tta_score, dump = self.predict(group, f"{name}_tta", config, weights, tta=True)
            self.row(group, f"{name} + TTA", tta_score, reference, [f"predict_{name}_tta"])
        return out_dir, dump

    def ensemble(self, name, dumps, extra, reference):
        score_dir = self.path("scores", name)
        cmd = [
            "python", "tools/ensemble.py", "--dumps", *dumps,
            "--dataset", "loop_val", "--config-file", self.s.config_a,
            "--score", "--score-dir", score_dir, "--workers", str(self.s.ensemble_workers),
            *extra, *self.dataset_opts(),
        ]  # fmt: skip
        score = os.path.join(score_dir, "lb_metrics.json")
        cost = 20 + self.num_images("val") * (0.5 if "--crf" in extra else 0.1)
        self.add("ensemble", Step(f"ensemble_{name}", cmd, [score], [score_dir], cost=cost))
        self.row("ensemble", name.replace("_", " "), score, reference, [f"ensemble_{name}"])

    def build(self):
        s = self.s
        self.convert()
        iters = s.budget_iters
        _, dump_a = self.model("models", "A", s.config_a, s.seed_a, iters, tta=s.tta)
        _, dump_b = self.model("models", "B", s.config_b, s.seed_b, iters, reference="A", tta=s.tta)
        dumps = [dump_a, dump_b]
        presets = list(CRF_PRESETS) if s.crf_presets is None else list(s.crf_presets)
        unknown = sorted(set(presets) - set(CRF_PRESETS))
        if not presets or unknown:
            raise ValueError(f"crf_presets {presets}: choose from {sorted(CRF_PRESETS)}")
        if s.all_ensemble_rows:
            self.ensemble("A+B", dumps, [], "A")
            for preset in presets:
                self.ensemble(f"A+B_crf_{preset}", dumps, ["--crf", preset], "A")
        post = ["--crf", presets[0], "--agreement-overwrite"]
        self.ensemble(f"A+B_crf_{presets[0]}_agreement", dumps, post, "A")
        if s.all_ensemble_rows:
            mode = post + ["--mode-filter"]
            self.ensemble(f"A+B_crf_{presets[0]}_agreement_mode", dumps, mode, "A")

        pseudo_dir = self.path("pseudo", "val")
        pseudo_json = os.path.join(pseudo_dir, "pseudo.json")
        cmd = [
            "python", "tools/pseudo_label.py", "--dumps", *dumps,
            "--json", self.json_of("val"), "--image-root", self.images_of("val"),
            "--output", pseudo_dir, "--ignore-label", str(s.ignore_label),
            "--threshold", str(s.pseudo_threshold), "--name", "loop_val_pseudo",
        ]  # fmt: skip
        cost = 20 + 0.2 * self.num_images("val")
        self.add("pseudo", Step("pseudo_val", cmd, [pseudo_json], [pseudo_dir], cost=cost))
        pseudo_entry = [["loop_val_pseudo", pseudo_json, self.images_of("val")]]
        pseudo_opts = [
            "DATASETS.PSEUDO_LABELS", repr(pseudo_entry),
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True",
        ]  # fmt: skip
        for flag in s.pseudo_ignore_in_mask:
            name = f"A_pseudo_ignore_mask_{'on' if flag else 'off'}"
            opts = pseudo_opts + ["MODEL.MASK_FORMER.IGNORE_IN_MASK_LOSS", str(flag)]
            train_sets = ("loop_train", "loop_val_pseudo")
            out_dir = self.train("pseudo", name, s.config_a, s.seed_a, iters, opts, train_sets)
            weights = os.path.join(out_dir, "model_final.pth")
            _, score, _ = self.predict("pseudo", name, s.config_a, weights, probs=False)
            self.row(
                "pseudo", name.replace("_", " "), score, "A", [f"train_{name}", f"predict_{name}"]
            )

        it = s.ablation_iters
        base = "abl_init_official_seed1"
        ablations = [
            (base, s.seed_a, ["MODEL.SWIN.INIT", "official"]),
            ("abl_init_official_seed2", s.seed_a + 1, ["MODEL.SWIN.INIT", "official"]),
            ("abl_init_trunc_normal_seed1", s.seed_a, ["MODEL.SWIN.INIT", "trunc_normal"]),
            ("abl_init_trunc_normal_seed2", s.seed_a + 1, ["MODEL.SWIN.INIT", "trunc_normal"]),
            ("abl_jitter_off", s.seed_a, ["INPUT.MIN_SIZE_TRAIN", self.jitter(False)]),
            ("abl_ema_on", s.seed_a, [
                "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.EVAL", "False",
                "SOLVER.EMA.DECAY", "0.999", "SOLVER.EMA.WARMUP_ITERS", str(max(1, it // 4)),
            ]),
            ("abl_class_weights", s.seed_a, [
                "MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE", "inverse_sqrt_frequency",
            ]),
            ("abl_copy_paste_on", s.seed_a, [
                "INPUT.COPY_PASTE.ENABLED", "True",
                "DATASETS.TEST", "('loop_val',)", "TEST.EVAL_PERIOD", str(max(1, it // 2)),
            ]),
        ]  # fmt: skip
        for name, seed, opts in ablations:
            out_dir = self.train("ablations", name, s.config_a, seed, it, opts)
            final = "model_final_ema.pth" if name == "abl_ema_on" else "model_final.pth"
            weights = os.path.join(out_dir, final)
            _, score, _ = self.predict("ablations", name, s.config_a, weights, probs=False)
            reference = None if name == base else base
            self.row("ablations", name, score, reference, [f"train_{name}", f"predict_{name}"])
        return self


def build_loop(settings: LoopSettings):
    """(steps, rows) of the loop: the selected steps in order, every table row."""
    loop = _Loop(settings).build()
    return loop.steps, loop.rows


def run_loop(settings: LoopSettings, command: str = "") -> Dict:
    """Run (or resume) the loop; writes ``results.md`` and ``results.json`` (atomically) into
    ``settings.output`` and returns the JSON document."""
    steps, rows = build_loop(settings)
    os.makedirs(settings.output, exist_ok=True)
    runner = StepRunner(
        settings.output, cwd=os.path.abspath(settings.repo_root), jobs=settings.jobs
    )
    runner.run(steps)
    rare = [c for c in RARE_CLASSES if c in settings.class_names]
    document = {
        "command": command,
        "data_root": settings.data_root,
        "budget": {
            "main_iters": settings.budget_iters,
            "ablation_iters": settings.ablation_iters,
        },
        "jobs": settings.jobs,
        "rows": collect_rows(rows, runner.wall_times, rare),
        "wall_s": dict(runner.wall_times),
    }
    write_json(os.path.join(settings.output, "results.json"), document, indent=1)
    table = format_table(document, rare)
    with atomic_write(os.path.join(settings.output, "results.md"), "w") as f:
        f.write(table)
    logger.info("results in %s:\n%s", settings.output, table)
    return document
