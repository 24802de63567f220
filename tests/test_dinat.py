"""DiNAT backbone: shapes and strides, official parameter names, the checkpoint converter, drop
path, determinism and the YAML configs."""

import argparse
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec, build_backbone
from torch import nn

from dinat import D2DiNAT, DiNAT, add_dinat_config
from dinat.convert import convert_dinat_checkpoint, convert_dinat_state_dict
from mask2former.modeling.layers import DropPath

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(
    embed_dim=16,
    depths=[1, 2, 1, 1],
    num_heads=[1, 2, 2, 4],
    kernel_size=3,
    dilations=[[2], [1, 3], [2], [1]],
    mlp_ratio=2.0,
    drop_path_rate=0.0,
    attention_impl="tiled",
)


def _tiny(**overrides):
    torch.manual_seed(0)
    return DiNAT(**{**TINY, **overrides})


def _official_state_keys(depths, heads, kernel, dim, layer_scale=False, rpb=True):
    """Parameter names and shapes of the official DiNAT Mask2Former backbone (mask2former/dinat.py
    of SHI-Labs/Neighborhood-Attention-Transformer), written out from its architecture."""
    keys = {
        "patch_embed.proj.0.weight": (dim // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": (dim // 2,),
        "patch_embed.proj.1.weight": (dim, dim // 2, 3, 3),
        "patch_embed.proj.1.bias": (dim,),
        "patch_embed.norm.weight": (dim,),
        "patch_embed.norm.bias": (dim,),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = dim * 2**i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            keys.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "attn.qkv.weight": (3 * c, c),
                    p + "attn.qkv.bias": (3 * c,),
                    p + "attn.proj.weight": (c, c),
                    p + "attn.proj.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (2 * c, c),
                    p + "mlp.fc1.bias": (2 * c,),
                    p + "mlp.fc2.weight": (c, 2 * c),
                    p + "mlp.fc2.bias": (c,),
                }
            )
            if rpb:
                keys[p + "attn.rpb"] = (h, 2 * kernel - 1, 2 * kernel - 1)
            if layer_scale:
                keys[p + "gamma1"] = (c,)
                keys[p + "gamma2"] = (c,)
        if i < len(depths) - 1:
            keys[f"levels.{i}.downsample.reduction.weight"] = (2 * c, c, 3, 3)
            keys[f"levels.{i}.downsample.norm.weight"] = (2 * c,)
            keys[f"levels.{i}.downsample.norm.bias"] = (2 * c,)
    for i in range(4):
        keys[f"norm{i}.weight"] = (dim * 2**i,)
        keys[f"norm{i}.bias"] = (dim * 2**i,)
    return keys


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("height,width", [(61, 45), (64, 64), (33, 97)])
def test_output_shapes_and_strides(height, width):
    model = _tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    shapes = model.output_shape()
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, stride in zip(out, (4, 8, 16, 32)):
        assert shapes[name].stride == stride
        # Each stride-2 3x3 conv (padding 1) maps n -> ceil(n / 2).
        expected = (2, shapes[name].channels, -(-height // stride), -(-width // stride))
        assert tuple(out[name].shape) == expected
        assert torch.isfinite(out[name]).all()
    assert [s.channels for s in shapes.values()] == [16, 32, 64, 128]
    assert model.size_divisibility == 32


def test_out_features_subset():
    model = _tiny(out_features=["res3", "res5"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"] and list(model.output_shape()) == ["res3", "res5"]
    assert not hasattr(model, "norm0") and hasattr(model, "norm1")


def test_out_features_subset_builds_only_parameters_that_get_gradients():
    # DistributedDataParallel (find_unused_parameters=False) fails on any parameter without a
    # gradient: later levels and the last returned level's downsampler must not exist.
    model = _tiny(out_features=["res2", "res4"])
    assert len(model.levels) == 3 and model.levels[2].downsample is None
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res2", "res4"]
    sum(o.square().mean() for o in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------- official names
@pytest.mark.parametrize("layer_scale,rpb", [(None, True), (1e-5, True), (None, False)])
def test_state_dict_matches_official_names(layer_scale, rpb):
    model = _tiny(layer_scale=layer_scale, rpb=rpb)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _official_state_keys(
        TINY["depths"], TINY["num_heads"], 3, 16, layer_scale is not None, rpb
    )
    assert got == want
    if layer_scale is not None:
        assert torch.all(model.levels[0].blocks[0].gamma1 == 1e-5)


def test_build_from_cfg_via_registry():
    cfg = get_cfg()
    add_dinat_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2DiNAT"
    cfg.MODEL.DINAT.EMBED_DIM = 16
    cfg.MODEL.DINAT.DEPTHS = [1, 1, 2, 1]
    cfg.MODEL.DINAT.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.DINAT.KERNEL_SIZE = 5
    cfg.MODEL.DINAT.DILATIONS = [[2], [1], [1, 2], [1]]
    cfg.MODEL.DINAT.LAYER_SCALE = 1.0
    assert "D2DiNAT" in BACKBONE_REGISTRY
    model = build_backbone(cfg)
    assert isinstance(model, D2DiNAT)
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "res2": (16, 4),
        "res3": (32, 8),
        "res4": (64, 16),
        "res5": (128, 32),
    }
    block = model.levels[2].blocks[1]
    assert (block.attn.kernel_size, block.attn.dilation, block.attn.num_heads) == (5, 2, 2)
    assert block.layer_scale and model.size_divisibility == 32
    # Detectron2's configurable constructor also works without a config.
    direct = D2DiNAT(**TINY)
    assert set(direct.state_dict()) == set(_tiny().state_dict())


def test_dilations_must_match_depths():
    with pytest.raises(ValueError, match="DILATIONS"):
        _tiny(dilations=[[1], [1], [1], [1]])


# ----------------------------------------------------------------------------- behaviour
def test_drop_path_only_in_training():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # whole samples dropped, rest scaled
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_path_equals_the_written_out_scaling_with_its_gradient(dtype):
    """Bit for bit the values and gradients of ``x / keep * mask`` with the same draws,
    signed zeros of dropped negative values included."""
    drop = DropPath(0.3).train()
    x = torch.randn(16, 5, 7, dtype=dtype, requires_grad=True)
    grad = torch.randn(16, 5, 7, dtype=dtype)
    torch.manual_seed(4)
    y = drop(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    torch.manual_seed(4)
    mask = torch.empty(16, 1, 1, dtype=dtype).bernoulli_(0.7)
    assert 0 < mask.sum() < 16  # both kinds of samples
    expected = x.detach() / 0.7 * mask
    expected_grad = grad * mask / 0.7
    assert torch.equal(y, expected) and torch.equal(dx, expected_grad)
    assert torch.equal(torch.signbit(y), torch.signbit(expected))
    assert torch.equal(torch.signbit(dx), torch.signbit(expected_grad))


def test_eval_is_deterministic_and_training_uses_drop_path():
    model = _tiny(drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for name in a:
        assert torch.equal(a[name], b[name])
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        c = model(x)
        torch.manual_seed(2)
        d = model(x)
    assert not torch.allclose(c["res5"], d["res5"])
    # Same seed, same result in training too.
    with torch.no_grad():
        torch.manual_seed(1)
        e = model(x)
    assert torch.equal(c["res5"], e["res5"])


def test_backward_reaches_every_parameter():
    model = _tiny()
    out = model(torch.randn(1, 3, 48, 40))
    sum(o.square().mean() for o in out.values()).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing


# ----------------------------------------------------------------------------- converter
def _fake_official_checkpoint(model: DiNAT):
    """An ImageNet classification checkpoint in the official layout: the backbone's parameters
    without the per-level output norms, plus the final norm and the classifier head."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    channels = model.num_features[-1]
    state["norm.weight"], state["norm.bias"] = torch.rand(channels), torch.rand(channels)
    state["head.weight"], state["head.bias"] = torch.rand(1000, channels), torch.rand(1000)
    return state


class _Wrapper(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_converter_round_trip(tmp_path, wrapper):
    source = _tiny(layer_scale=1e-5)
    state = _fake_official_checkpoint(source)
    src = tmp_path / "dinat_in1k.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 300}, src)

    from mask2former.cli.convert_dinat import main as cli_main  # a wrapper over dinat.convert

    dst = tmp_path / "out" / "dinat_d2.pth"
    assert cli_main([str(src), str(dst)]) == 0
    assert sorted(os.listdir(dst.parent)) == ["dinat_d2.pth"]  # atomic write left no temp file
    converted = torch.load(dst, weights_only=True)["model"]
    kept = {"backbone." + k for k in state if not k.startswith(("norm.", "head."))}
    assert set(converted) == kept

    target = _Wrapper(_tiny(layer_scale=1e-5))
    torch.manual_seed(3)
    for p in target.parameters():
        nn.init.normal_(p)
    norm0_before = target.backbone.norm0.weight.clone()
    DetectionCheckpointer(target).load(str(dst))
    for name, tensor in target.backbone.state_dict().items():
        if name.startswith("norm"):
            continue
        assert torch.equal(tensor, state[name]), name
    assert torch.equal(target.backbone.norm0.weight, norm0_before)  # not in an ImageNet checkpoint


def test_converter_rejects_other_checkpoints(tmp_path):
    swin_like = {
        "patch_embed.proj.weight": torch.zeros(96, 3, 4, 4),
        "layers.0.blocks.0.attn.qkv.weight": torch.zeros(1),
    }
    src = tmp_path / "swin_tiny.pth"
    torch.save({"model": swin_like}, src)
    with pytest.raises(ValueError, match="swin_tiny.pth: not an official DiNAT"):
        convert_dinat_checkpoint(str(src), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises(ValueError, match="already a Detectron2 checkpoint"):
        convert_dinat_state_dict({"backbone.patch_embed.proj.0.weight": torch.zeros(1)})


def test_converter_pickled_objects_need_trust(tmp_path):
    state = _fake_official_checkpoint(_tiny())
    src = tmp_path / "train_ckpt.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-3)}, src)
    with pytest.raises(ValueError, match="train_ckpt.pth: holds Python objects .* --trusted"):
        convert_dinat_checkpoint(str(src), str(tmp_path / "a.pth"))
    count, dropped = convert_dinat_checkpoint(str(src), str(tmp_path / "a.pth"), trusted=True)
    assert count == len(state) - 4
    assert sorted(dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]


# ----------------------------------------------------------------------------- configs
def _project_cfg(path):
    """Detectron2 + DeepLab + Mask2Former + DiNAT keys, merged with the YAML file."""
    from detectron2.projects.deeplab import add_deeplab_config

    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_dinat_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    return cfg


def test_dinat_large_config():
    cfg = _project_cfg("configs/m2f_dinat_l.yaml")
    c = cfg.MODEL.DINAT
    assert cfg.MODEL.BACKBONE.NAME == "D2DiNAT"
    assert (c.EMBED_DIM, list(c.DEPTHS), list(c.NUM_HEADS)) == (192, [3, 4, 18, 5], [6, 12, 24, 48])
    assert (c.KERNEL_SIZE, c.MLP_RATIO, c.DROP_PATH_RATE, c.RPB) == (11, 2.0, 0.3, True)
    assert [len(d) for d in c.DILATIONS] == list(c.DEPTHS)
    assert c.DILATIONS[0] == [1, 14, 1] and c.DILATIONS[1] == [1, 4, 1, 7]
    assert c.DILATIONS[2] == [1, 2, 1, 3] * 4 + [1, 3]  # as the official config
    assert c.DILATIONS[3] == [1] * 5
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == list(range(320, 1281, 32))


def test_tiny_cpu_config_backbone_runs():
    cfg = _project_cfg("configs/tiny/m2f_dinat_tiny_cpu.yaml")
    model = build_backbone(cfg).eval()
    assert isinstance(model, D2DiNAT)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "res2": (32, 32, 32),
        "res3": (64, 16, 16),
        "res4": (128, 8, 8),
        "res5": (256, 4, 4),
    }
    assert ShapeSpec(channels=256, stride=32) == model.output_shape()["res5"]
