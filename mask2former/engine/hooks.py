"""Training hooks: the copy-paste bank regenerated before training and after every evaluation."""

import logging
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.augmentation.copy_paste import ObjectPool, generate_bank

logger = logging.getLogger(__name__)


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
    reads the per-class IoUs it stored and writes a bank weighted toward the weak classes.
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
        )
        self.class_weighting = class_weighting
        self.generation = 0
        self._records: Optional[List[dict]] = None
        self._pool: Optional[ObjectPool] = None

    def _regenerate(self, iou: Optional[Dict[int, float]]) -> None:
        # The main process's IoUs are shared so that every machine builds the same bank.
        iou = comm.all_gather(iou)[0]
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
        comm.synchronize()

    def before_train(self):
        self._regenerate(None)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (
            self.eval_period <= 0
            or next_iter % self.eval_period != 0
            or next_iter == self.trainer.max_iter
        ):
            return
        iou = None
        if comm.is_main_process():
            latest = {k: v[0] for k, v in self.trainer.storage.latest().items()}
            found = iou_by_label(latest, self.class_names)
            iou = {k: v for k, v in found.items() if not math.isnan(v)} or None
            if iou is None:
                logger.warning(
                    "copy-paste bank: no per-class IoU found "
                    "after evaluation; using uniform weights"
                )
        self._regenerate(iou)
