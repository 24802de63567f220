"""The Detectron2 trainer of this project."""
import os

from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.projects.deeplab import build_lr_scheduler

from ..data.mapper import MaskFormerSemanticDatasetMapper
from ..evaluation import LBSemSegEvaluator
from .optimizer import build_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with the semantic mapper, the LB-style evaluator, the Mask2Former optimizer,
    the poly LR schedule and the copy-paste bank hook."""

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
        mapper = MaskFormerSemanticDatasetMapper(cfg, True)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)
