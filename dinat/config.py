"""Config keys of the dinat package.

``add_dinat_config`` adds ``cfg.MODEL.DINAT``: the keys of the official DiNAT Mask2Former code
(SHI-Labs/Neighborhood-Attention-Transformer, ``mask2former/``), so its YAML files load unchanged,
plus this project's keys (layer scale, rpb switch, attention implementation, small-input padding).
"""

from detectron2.config import CfgNode as CN


def add_dinat_config(cfg):
    """Add ``MODEL.DINAT`` (official names + ours) to ``cfg`` in place."""
    cfg.MODEL.DINAT = CN()
    # Channels of level 0 (res2); doubled at every level.
    cfg.MODEL.DINAT.EMBED_DIM = 192
    # Blocks per level.
    cfg.MODEL.DINAT.DEPTHS = [3, 4, 18, 5]
    # Attention heads per level.
    cfg.MODEL.DINAT.NUM_HEADS = [6, 12, 24, 48]
    # Neighborhood (window) side k, odd. The relative positional bias has shape [heads, 2k-1, 2k-1].
    cfg.MODEL.DINAT.KERNEL_SIZE = 7
    # Per level, the dilation of every block (one list per level, one entry per block);
    # None = no dilation (NAT).
    cfg.MODEL.DINAT.DILATIONS = None
    # MLP hidden width / channels.
    cfg.MODEL.DINAT.MLP_RATIO = 2.0
    # Bias in the qkv projection.
    cfg.MODEL.DINAT.QKV_BIAS = True
    # Attention logit scale; None = head_dim ** -0.5.
    cfg.MODEL.DINAT.QK_SCALE = None
    # Dropout after the attention output projection and inside the MLP.
    cfg.MODEL.DINAT.DROP_RATE = 0.0
    # Attention-probability dropout. Must be 0: no neighborhood attention path implements it.
    cfg.MODEL.DINAT.ATTN_DROP_RATE = 0.0
    # Stochastic depth, increasing linearly from 0 over all blocks up to this rate.
    cfg.MODEL.DINAT.DROP_PATH_RATE = 0.3
    # Levels returned by the backbone (subset of res2..res5, strides 4..32).
    cfg.MODEL.DINAT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # ---------------------------------------------------------------- project keys
    # Per-channel residual scales gamma1/gamma2 initialised to this value (as in NAT-S/B);
    # None = off (DiNAT-L and the official Mask2Former backbone).
    cfg.MODEL.DINAT.LAYER_SCALE = None
    # Learn the relative positional bias `rpb` (official DiNAT: True). False drops it, which
    # allows NATTEN's fused kernels (NATTEN >= 0.20 has no rpb) but no longer matches official
    # checkpoints.
    cfg.MODEL.DINAT.RPB = True
    # Neighborhood attention implementation:
    #   "auto"      - NATTEN's fused kernel when RPB is False and NATTEN has its compiled library
    #                 on this CUDA device, else "flex" on CUDA, else "tiled"; logged once;
    #   "tiled"     - pure-PyTorch tiled path with bounded memory (fast on CPU, runs anywhere);
    #   "flex"      - torch flex_attention (compiled on CUDA; CPU: forward only, slow);
    #   "natten"    - natten.functional.na2d (requires RPB False; NATTEN's CPU path is very slow);
    #   "reference" - brute force (large memory; used by the ONNX export and the tests).
    cfg.MODEL.DINAT.ATTENTION_IMPL = "auto"
    # Feature maps smaller than KERNEL_SIZE x dilation: True = zero-pad the (normed) input at the
    # bottom/right up to that size before the qkv projection and crop the output, as NATTEN 0.14
    # did for the official checkpoints (DiNAT-L: kernel 11 x dilation 14 at res2 needs 154 tokens,
    # i.e. 616 px inputs); False = raise an error.
    cfg.MODEL.DINAT.PAD_SMALL_INPUTS = True
