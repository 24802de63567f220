"""Swin initialisation (MODEL.SWIN.INIT) and the weight decay of the pixel decoder's
level_embed, both as in the official Mask2Former code."""

import math

import pytest
import torch
from detectron2.modeling import build_backbone
from torch import nn

from mask2former.engine import get_param_groups, get_project_cfg
from mask2former.modeling.backbone.swin import D2SwinTransformer

TINY = dict(
    embed_dim=96, depths=(2, 1, 1, 1), num_heads=(3, 6, 6, 6), window_size=4, drop_path_rate=0.0
)


def qkv_layers(model):
    return [m.attn.qkv for stage in model.layers for m in stage.blocks]


def test_official_init_keeps_pytorch_default_linear_init():
    """PyTorch's Linear default: weights uniform(+-1/sqrt(fan_in)) (std 1/sqrt(3 fan_in) =
    0.059 for fan-in 96), biases uniform(+-1/sqrt(fan_in)), not zero."""
    torch.manual_seed(0)
    model = D2SwinTransformer(init="official", **TINY)
    qkv = qkv_layers(model)[0]
    bound = 1 / math.sqrt(96)
    assert qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert qkv.weight.abs().max().item() <= bound
    assert qkv.bias.abs().max().item() > bound / 2  # uniform biases, not zeros
    # the relative position tables are truncated normal std 0.02 in the official code too
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.std().item() == pytest.approx(0.02, rel=0.2)


def test_trunc_normal_init_option():
    torch.manual_seed(0)
    model = D2SwinTransformer(init="trunc_normal", **TINY)
    for layer in qkv_layers(model):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.count_nonzero(layer.bias) == 0


def test_config_key_defaults_to_official_and_reaches_the_backbone():
    cfg = get_project_cfg()
    assert cfg.MODEL.SWIN.INIT == "official"
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 6, 6]
    biases = {}
    for init in ("official", "trunc_normal"):
        cfg.MODEL.SWIN.INIT = init
        torch.manual_seed(0)
        biases[init] = qkv_layers(build_backbone(cfg))[0].bias
    assert torch.count_nonzero(biases["official"]) > 0
    assert torch.count_nonzero(biases["trunc_normal"]) == 0
    with pytest.raises(ValueError, match="Swin init must be one of"):
        D2SwinTransformer(init="xavier", **TINY)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(3, 8))  # plain parameter, as officially
        self.query_embed = nn.Embedding(4, 8)


def test_level_embed_gets_the_weight_decay():
    """The official optimizer exempts nn.Embedding modules, not the plain level_embed."""
    cfg = get_project_cfg()
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    model = Decoder()
    decay = {id(g["params"][0]): g["weight_decay"] for g in get_param_groups(cfg, model)}
    assert decay[id(model.level_embed)] == 0.05
    assert decay[id(model.query_embed.weight)] == 0.0
