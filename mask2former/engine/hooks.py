"""Training hooks: the copy-paste bank regenerated before training and after every evaluation."""

import json
import logging
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.augmentation.copy_paste import ObjectPool, generate_bank
from ..utils.io import write_json

logger = logging.getLogger(__name__)


def bank_background_from_cfg(cfg) -> Optional[int]:
    """The background label of the bank's json (0), or None when the training data has no
    background class (its uncovered pixels are ignored: every label is an object class)."""
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    return None if meta.get("uncovered", "background") == "ignore" else 0


def bank_root_from_cfg(cfg) -> str:
    """The bank folder of this machine (relative INPUT.COPY_PASTE.DIR is inside OUTPUT_DIR).

    Each machine writes its own copy (same seed and class weights -> same bank), so multi-machine
    training works with or without a shared OUTPUT_DIR.
    """
    root = cfg.INPUT.COPY_PASTE.DIR
    if not os.path.isabs(root):
        root = os.path.join(cfg.OUTPUT_DIR, root)
    machine = comm.get_rank() // max(comm.get_local_size(), 1)
    return os.path.join(root, f"machine{machine}")


def iou_prefix_from_cfg(cfg) -> str:
    """Storage key prefix of the per-class IoUs that weight the bank's classes.

    ``INPUT.COPY_PASTE.IOU_DATASET`` names one of ``DATASETS.TEST`` ("" = the first). With one test
    dataset Detectron2 stores its results as ``sem_seg/IoU-<class>``, with several under the
    dataset's name: ``<dataset>/sem_seg/IoU-<class>``.
    """
    tests = list(cfg.DATASETS.TEST)
    name = cfg.INPUT.COPY_PASTE.IOU_DATASET
    if name and name not in tests:
        raise ValueError(
            f"INPUT.COPY_PASTE.IOU_DATASET {name!r} is not one of DATASETS.TEST {tests}"
        )
    if len(tests) <= 1:
        return "sem_seg/IoU-"
    return f"{name or tests[0]}/sem_seg/IoU-"


def iou_by_label(
    latest: Dict[str, float], class_names: Sequence[str], prefix: str = "sem_seg/IoU-"
) -> Dict[int, float]:
    """Per-label IoU from the trainer's latest scalars (as put there by Detectron2's EvalHook)."""
    out = {}
    for label, name in enumerate(class_names):
        key = prefix + name
        if key in latest:
            out[label] = float(latest[key])
    return out


class CopyPasteBankHook(HookBase):
    """Regenerates the copy-paste bank before training and right after every periodic evaluation.

    Register it after Detectron2's EvalHook: at the iterations where that hook evaluates, this one
    reads the per-class IoUs it stored (keys ``iou_prefix + class name``) and writes a bank
    weighted toward the weak classes. Its state (generation counter, hence the next seed, and the
    IoUs of the last evaluation) is restored on resume, so a resumed training continues the
    sequence: its first bank uses the IoUs of the last evaluation and the next generation.
    """

    def __init__(
        self,
        records_fn: Callable[[], List[dict]],
        bank_root: str,
        class_names: Sequence[str],
        eval_period: int,
        num_images: int,
        seed: int,
        objects_per_image=(1, 3),
        scale_range=(0.5, 1.5),
        blend_sigma: float = 0.0,
        class_weighting: str = "one_minus_iou",
        draw_order: str = "area_desc",
        ignore_label: int = 255,
        iou_prefix: str = "sem_seg/IoU-",
        background: Optional[int] = 0,
    ):
        if class_weighting not in ("one_minus_iou", "uniform"):
            raise ValueError(
                "INPUT.COPY_PASTE.CLASS_WEIGHTING must be "
                f"one_minus_iou or uniform, got {class_weighting!r}"
            )
        self._records_fn = records_fn
        self.bank_root = bank_root
        self.class_names = list(class_names)
        self.eval_period = eval_period
        self.num_images = num_images
        self.seed = seed
        self.kwargs = dict(
            objects_per_image=tuple(objects_per_image),
            scale_range=tuple(scale_range),
            blend_sigma=blend_sigma,
            draw_order=draw_order,
            ignore_label=ignore_label,
            background=background,
        )
        self.class_weighting = class_weighting
        self.iou_prefix = iou_prefix
        self.generation = 0
        # per-label IoUs of the last evaluation (None before the first one)
        self.last_iou: Optional[Dict[int, float]] = None
        self._records: Optional[List[dict]] = None
        self._pool: Optional[ObjectPool] = None
        self._resumed: Optional[dict] = None  # the checkpoint's state on resume

    def _regenerate(self, iou: Optional[Dict[int, float]], iteration: int) -> None:
        # The main process's IoUs are shared so that every machine builds the same bank.
        iou = comm.all_gather(iou)[0]
        self.last_iou = iou
        if comm.get_local_rank() == 0:
            if self._records is None:
                self._records = self._records_fn()
                self._pool = ObjectPool(self._records)
            weights = iou if self.class_weighting == "one_minus_iou" else None
            folder = generate_bank(
                self._records,
                self.bank_root,
                self.num_images,
                weights,
                seed=self.seed + self.generation,
                pool=self._pool,
                class_names=self.class_names,
                **self.kwargs,
            )
            logger.info(
                "copy-paste bank %d written to %s (class IoUs used: %s)",
                self.generation,
                folder,
                "none (uniform)"
                if weights is None
                else ", ".join(
                    f"{self.class_names[c]} {v:.3f}" for c, v in sorted(weights.items())
                ),
            )
        self.generation += 1
        self._record(iteration)
        comm.synchronize()

    # -- resume ------------------------------------------------------------------------------
    # A checkpoint holds the hook's state (``state_dict``). Detectron2 writes a checkpoint before
    # the evaluation of the same iteration (and the final one before the final evaluation), so
    # the hook also keeps, in its bank folder, its state after every bank and final evaluation
    # by iteration (``HISTORY_NAME``); a resumed training takes the entry of the checkpoint's own
    # iteration when it is newer than the checkpoint's state (an evaluation that followed it).

    HISTORY_NAME = "state.json"

    @property
    def history_path(self) -> str:
        return os.path.join(self.bank_root, self.HISTORY_NAME)

    def _state(self, iteration: int) -> dict:
        iou = self.last_iou
        return {
            "iteration": int(iteration),
            "generation": self.generation,
            "last_iou": None if iou is None else {int(k): float(v) for k, v in iou.items()},
        }

    def _record(self, iteration: int) -> None:
        """Add the current state to the history, dropping entries it supersedes (from a run that
        went further before the resume, or from an earlier training in the same folder)."""
        if comm.get_local_rank() != 0:
            return
        history = [e for e in self._read_history() if e["iteration"] < iteration]
        history.append(self._state(iteration))
        write_json(self.history_path, {"history": history}, indent=1)

    def _read_history(self) -> List[dict]:
        if not os.path.isfile(self.history_path):
            return []
        try:
            with open(self.history_path) as f:
                history = json.load(f)["history"]
            return [
                {
                    "iteration": int(e["iteration"]),
                    "generation": int(e["generation"]),
                    "last_iou": e["last_iou"],
                }
                for e in history
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.history_path}: not a copy-paste bank state file ({e})") from e

    def state_dict(self) -> dict:
        return self._state(self.trainer.iter)

    def load_state_dict(self, state: dict) -> None:
        self._resumed = dict(state)

    def _restore(self) -> int:
        """Generation and IoUs to continue from after a resume; returns the resumed iteration."""
        state = self._resumed
        if comm.is_main_process():
            later = [
                e
                for e in self._read_history()
                if e["iteration"] == state["iteration"] and e["generation"] >= state["generation"]
            ]
            state = later[-1] if later else state
        state = comm.all_gather(state)[0]
        self.generation = int(state["generation"])
        iou = state["last_iou"]
        self.last_iou = None if iou is None else {int(k): float(v) for k, v in iou.items()}
        return int(state["iteration"])

    # -- hook --------------------------------------------------------------------------------

    def _read_iou(self, warn: bool = True) -> Optional[Dict[int, float]]:
        """IoUs of the evaluation just stored (main process; None elsewhere or if absent)."""
        if not comm.is_main_process():
            return None
        latest = {k: v[0] for k, v in self.trainer.storage.latest().items()}
        found = iou_by_label(latest, self.class_names, prefix=self.iou_prefix)
        iou = {k: v for k, v in found.items() if not math.isnan(v)} or None
        if iou is None and warn:
            logger.warning(
                "copy-paste bank: no per-class IoU (%s<class>) found after evaluation; "
                "using uniform weights",
                self.iou_prefix,
            )
        return iou

    def before_train(self):
        iteration = -1
        if self._resumed is not None:
            # continue the sequence: the IoUs of the last evaluation, the next generation
            iteration = self._restore()
        self._regenerate(self.last_iou, iteration)

    def after_train(self):
        # The final evaluation writes no bank, but a resumed, longer training starts from its IoUs.
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # as EvalHook's final evaluation
            iou = comm.all_gather(self._read_iou(warn=False))[0]
            if iou is not None:
                self.last_iou = iou
                self._record(self.trainer.max_iter - 1)  # the final checkpoint's iteration

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (
            self.eval_period <= 0
            or next_iter % self.eval_period != 0
            or next_iter == self.trainer.max_iter
        ):
            return
        self._regenerate(self._read_iou(), self.trainer.iter)


def bank_hook_from_cfg(cfg, records: Callable[[], List[dict]]) -> "CopyPasteBankHook":
    """The copy-paste bank hook of ``cfg.INPUT.COPY_PASTE`` over the training records that
    ``records()`` returns (what the trainer registers; benchmarks build the same one)."""
    cp = cfg.INPUT.COPY_PASTE
    return CopyPasteBankHook(
        records,
        bank_root_from_cfg(cfg),
        MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).stuff_classes,
        eval_period=cfg.TEST.EVAL_PERIOD,
        num_images=cp.BANK_SIZE,
        seed=max(cfg.SEED, 0),
        objects_per_image=cp.OBJECTS_PER_IMAGE,
        scale_range=cp.SCALE_RANGE,
        blend_sigma=cp.BLEND_SIGMA,
        class_weighting=cp.CLASS_WEIGHTING,
        draw_order=cfg.DATASETS.POLYGON_DRAW_ORDER,
        ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        iou_prefix=iou_prefix_from_cfg(cfg),
        background=bank_background_from_cfg(cfg),
    )
