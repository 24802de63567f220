"""Building the full project config (Detectron2 + DeepLab poly LR + Mask2Former + extensions)."""
import importlib
import logging
from typing import Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from ..config import add_maskformer2_config

# Packages that extend Mask2Former: "module:function" adding their config keys. Importing the
# module also registers their backbones / heads / meta-architectures.
CONFIG_EXTENSIONS = ("semask.config:add_semask_config", "dinat.config:add_dinat_config")


def add_extension_configs(cfg: CfgNode, extensions: Sequence[str] = CONFIG_EXTENSIONS) -> None:
    """Call every extension's ``add_*_config`` on ``cfg`` (and import its package)."""
    for spec in extensions:
        module_name, fn_name = spec.split(":")
        package = module_name.split(".")[0]
        importlib.import_module(package)
        getattr(importlib.import_module(module_name), fn_name)(cfg)


def get_project_cfg() -> CfgNode:
    """Detectron2 defaults plus every key of this project (unfrozen)."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_extension_configs(cfg)
    return cfg


def adjust_for_device(cfg: CfgNode) -> None:
    """Settings that cannot apply on the configured device, switched off with a log line.

    Detectron2's AMPTrainer needs CUDA, so mixed precision is turned off on CPU.
    """
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logging.getLogger(__name__).info("SOLVER.AMP.ENABLED set to False: MODEL.DEVICE is cpu")
        cfg.SOLVER.AMP.ENABLED = False


def build_cfg(config_file: str = "", opts: Sequence[str] = ()) -> CfgNode:
    """Project config from a YAML file and KEY VALUE overrides (frozen)."""
    cfg = get_project_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    adjust_for_device(cfg)
    cfg.freeze()
    return cfg
