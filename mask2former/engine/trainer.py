"""The Detectron2 trainer of this project."""

import itertools
import logging
import os
import random
import weakref
from collections import OrderedDict

from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.augmentation.copy_paste import CopyPasteSampler
from ..data.augmentation.mapper import MaskFormerSemanticDatasetMapper
from ..data.catalog.train_records import train_dataset_records
from ..evaluation import LBSemSegEvaluator
from ..inference.predictor import PredictorAsModel, SemSegPredictor
from .amp import MixedPrecisionTrainer, amp_dtype
from .checkpoint import SafeCheckpointer
from .ddp import create_ddp_model
from .ema import EMAEvalHook, EMAHook, ModelEMA
from .hooks import (
    CopyPasteBankHook,
    bank_hook_from_cfg,
    bank_root_from_cfg,
)
from .lr_scheduler import ResumableWarmupPolyLR, build_lr_scheduler
from .optimizer import build_optimizer


def train_records(cfg):
    """All records of ``cfg.DATASETS.TRAIN`` (the objects the copy-paste bank draws from)."""
    return list(itertools.chain.from_iterable(DatasetCatalog.get(n) for n in cfg.DATASETS.TRAIN))


def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The loop running one iteration: fp32, or mixed precision if ``SOLVER.AMP.ENABLED``
    (``SOLVER.AMP.PRECISION`` float16 or bfloat16)."""
    if cfg.SOLVER.AMP.ENABLED:
        return MixedPrecisionTrainer(
            model, data_loader, optimizer, precision=amp_dtype(cfg.SOLVER.AMP.PRECISION)
        )
    return SimpleTrainer(model, data_loader, optimizer)


# Training records the train mapper may draw in place of an image that cannot be decoded.
_FALLBACK_RECORDS = 256


class Trainer(DefaultTrainer):
    """DefaultTrainer with the semantic mapper, the LB-style evaluator, the Mask2Former optimizer,
    the poly LR schedule, the copy-paste bank hook, a DDP wrap that also works for CPU models,
    bfloat16 AMP and the project's checkpointer."""

    def __init__(self, cfg):
        """The steps of ``DefaultTrainer.__init__`` with this project's DDP wrap (no
        ``device_ids`` for CPU models, so ``--num-gpus N MODEL.DEVICE cpu`` trains with gloo),
        mixed-precision loop and checkpointer."""
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # train_net.py's default_setup was not called
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        # built in this order, as in DefaultTrainer
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # checkpoints next to the logs and metrics; written by the main process only
        self.checkpointer = SafeCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            allow_code_execution=cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION,
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # The optimizer state loaded last holds the checkpoint's rates; the rates of the restored
        # position come from the current config (SOLVER.BASE_LR may have changed).
        if isinstance(self.scheduler, ResumableWarmupPolyLR):
            self.scheduler.apply_lr()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return LBSemSegEvaluator(
            dataset_name,
            distributed=True,
            output_dir=output_folder,
            plot_confusion_matrix=cfg.TEST.CONFUSION_MATRIX_PLOT,
        )

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.INPUT.DATASET_MAPPER_NAME != "mask_former_semantic":
            raise ValueError(
                f"INPUT.DATASET_MAPPER_NAME {cfg.INPUT.DATASET_MAPPER_NAME!r} is not supported: "
                "this project implements semantic segmentation ('mask_former_semantic')"
            )
        copy_paste = None
        if cfg.INPUT.COPY_PASTE.ENABLED:
            copy_paste = CopyPasteSampler(bank_root_from_cfg(cfg), cfg.INPUT.COPY_PASTE.PROB)
        # empty = without label file and without non-crowd annotations, in any dataset order
        dataset = train_dataset_records(cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        # Replacements of images that fail to decode (DATASETS.VALIDATION.UNREADABLE_IMAGE
        # "skip"): a fixed sample, so that every worker's mapper does not hold the whole dataset.
        rng = random.Random(max(cfg.SEED, 0))
        fallback = rng.sample(dataset, min(len(dataset), _FALLBACK_RECORDS))
        mapper = MaskFormerSemanticDatasetMapper(
            cfg, True, copy_paste=copy_paste, fallback_records=fallback
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate every ``DATASETS.TEST`` with this project's calibrated multi-scale + flip
        (``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``, ``FLIP``; :class:`SemSegPredictor`), the
        predictions of ``tools/predict.py --tta``. As in the official trainer the result keys
        get a ``_TTA`` suffix (``sem_seg_TTA``, or ``<dataset>_TTA`` with several test
        datasets); the evaluator files go to OUTPUT_DIR/inference_TTA/<dataset>."""
        logging.getLogger(__name__).info("Running inference with test-time augmentation ...")
        tta_model = PredictorAsModel(SemSegPredictor(cfg, model, tta=True), cfg.INPUT.FORMAT)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, tta_model, evaluators)
        return OrderedDict((f"{key}_TTA", value) for key, value in results.items())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        hook_list = super().build_hooks()
        cfg = self.cfg
        if cfg.INPUT.COPY_PASTE.ENABLED:
            bank_hook = bank_hook_from_cfg(cfg, lambda: train_records(cfg))
            # Right after the evaluation, whose per-class IoUs it reads.
            eval_index = max(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
            hook_list.insert(eval_index + 1, bank_hook)
        if cfg.SOLVER.EMA.ENABLED:
            self._add_ema_hooks(hook_list)
        return hook_list

    def _add_ema_hooks(self, hook_list):
        """The EMA update before the checkpointer (a checkpoint holds the EMA of its own
        iteration) and, with ``SOLVER.EMA.EVAL``, the EMA evaluation after the raw evaluation and
        the bank hook that reads the raw IoUs, before the writers (so both scores are written for
        the same iteration). The EMA evaluation writes its files to OUTPUT_DIR/inference_ema."""
        cfg = self.cfg
        ema = ModelEMA(cfg, self.model)
        first = min(
            i
            for i, h in enumerate(hook_list)
            if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        )
        hook_list.insert(first, EMAHook(ema, self.checkpointer, cfg.OUTPUT_DIR))
        if not cfg.SOLVER.EMA.EVAL:
            return

        def test_ema():
            evaluators = [
                self.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_ema", name))
                for name in cfg.DATASETS.TEST
            ]
            return self.test(cfg, self.model, evaluators)

        last = max(
            i for i, h in enumerate(hook_list) if isinstance(h, (hooks.EvalHook, CopyPasteBankHook))
        )
        hook_list.insert(last + 1, EMAEvalHook(ema, cfg.TEST.EVAL_PERIOD, test_ema))
