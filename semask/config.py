"""Config keys of the semask package.

``add_semask_config`` adds the keys of the official SeMask-Mask2Former code
(Picsart-AI-Research/SeMask-Segmentation, ``SeMask-Mask2Former/mask2former/config.py``) under the
same names, so its YAML files load unchanged, plus one project key. Call it after
``mask2former.config.add_maskformer2_config`` (it extends ``MODEL.SWIN`` and ``MODEL.MASK_FORMER``).
"""


def add_semask_config(cfg):
    """Add the SeMask keys to ``cfg`` in place."""
    if "SWIN" not in cfg.MODEL or "MASK_FORMER" not in cfg.MODEL:
        raise ValueError("call mask2former.config.add_maskformer2_config before add_semask_config")

    # ------------------------------------------------------------------ official keys
    # Window side of the semantic attention of windowed stages (official default 7; the
    # official Swin-L / Swin-B configs and the first-place trash recipe use 12).
    cfg.MODEL.SWIN.SEM_WINDOW_SIZE = 7
    # Semantic-attention blocks in the semantic layer after every Swin stage (>= 1; the class
    # map of a stage is the one of its last block).
    cfg.MODEL.SWIN.NUM_SEM_BLOCKS = 1
    # Weight of the per-pixel cross-entropy ("loss_cate") on the semantic branch, i.e. the sum of
    # the per-stage class maps upsampled to the input size (ignore label honoured).
    cfg.MODEL.MASK_FORMER.CATE_WEIGHT = 0.4

    # ------------------------------------------------------------------ project keys
    # Stages (0..3) whose semantic attention spans the whole feature map instead of windows of
    # SEM_WINDOW_SIZE. The official code chose this from the number of classes: [3] when
    # MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 (its ADE20K checkpoints), [] otherwise. Parameter
    # names are the same either way; set [3] to reproduce the official ADE20K models.
    cfg.MODEL.SWIN.SEM_GLOBAL_STAGES = []
