"""Building a config: Detectron2 defaults, DeepLab's poly LR keys, Mask2Former's keys, then the
keys of the extension packages the caller names (``semask``, ``dinat``: they depend on
``mask2former``, never the other way round), a YAML file and ``KEY VALUE`` overrides.

Scripts name their extensions explicitly, as Detectron2 projects do in ``train_net.py``::

    from dinat import add_dinat_config
    from semask import add_semask_config

    cfg = build_cfg(args.config_file, args.opts, (add_semask_config, add_dinat_config))

Importing an extension package also registers its backbones / heads / meta-architectures.
"""

import logging
from typing import Callable, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from ..config import add_maskformer2_config

__all__ = ["adjust_for_device", "build_cfg", "get_project_cfg"]

# ``add_*_config(cfg)`` functions of extension packages, applied after Mask2Former's.
ConfigAdders = Sequence[Callable[[CfgNode], None]]


def get_project_cfg(add_configs: ConfigAdders = ()) -> CfgNode:
    """Detectron2 defaults plus DeepLab's and Mask2Former's keys, then ``add_configs`` in order
    (unfrozen)."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    for add_config in add_configs:
        add_config(cfg)
    return cfg


def adjust_for_device(cfg: CfgNode) -> None:
    """Settings that cannot apply on the configured device, switched off with a log line.

    Detectron2's AMPTrainer needs CUDA, so mixed precision is turned off on CPU.
    """
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logging.getLogger(__name__).info("SOLVER.AMP.ENABLED set to False: MODEL.DEVICE is cpu")
        cfg.SOLVER.AMP.ENABLED = False


def build_cfg(
    config_file: str = "", opts: Sequence[str] = (), add_configs: ConfigAdders = ()
) -> CfgNode:
    """Project config (see :func:`get_project_cfg`) from a YAML file and KEY VALUE overrides
    (frozen)."""
    cfg = get_project_cfg(add_configs)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    adjust_for_device(cfg)
    cfg.freeze()
    return cfg
