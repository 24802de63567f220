"""Swin backbone: shapes, shifted-window attention against a brute-force reference, relative
position bias, frozen stages, official parameter names and checkpoint conversion / loading."""

import math
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, ShapeSpec
from detectron2.projects.deeplab import add_deeplab_config
from torch import nn

from mask2former.config import add_maskformer2_config
from mask2former.modeling.backbone.swin import (
    D2SwinTransformer,
    SwinTransformer,
    SwinTransformerBlock,
    WindowLayout,
    relative_position_index,
)
from mask2former.modeling.backbone.swin_convert import (
    convert_swin_checkpoint,
    interpolate_relative_position_bias_table,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3, drop_path_rate=0.0
)


def official_swin_keys(depths, ape=False, out_indices=(0, 1, 2, 3)):
    """State-dict names of the official (segmentation) Swin, from its architecture."""
    keys = [f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
    if ape:
        keys.append("absolute_pos_embed")
    block_params = [
        "norm1.weight",
        "norm1.bias",
        "attn.relative_position_bias_table",
        "attn.relative_position_index",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    for i, depth in enumerate(depths):
        keys += [f"layers.{i}.blocks.{j}.{p}" for j in range(depth) for p in block_params]
        if i < len(depths) - 1:
            merging = ("reduction.weight", "norm.weight", "norm.bias")
            keys += [f"layers.{i}.downsample.{p}" for p in merging]
    keys += [f"norm{i}.{p}" for i in out_indices for p in ("weight", "bias")]
    return set(keys)


# ------------------------------------------------------------------------------------ shapes
def test_odd_input_sizes_give_ceil_strides():
    model = D2SwinTransformer(**TINY)
    out = model(torch.randn(2, 3, 37, 53))
    expected = {"res2": (16, 10, 14), "res3": (32, 5, 7), "res4": (64, 3, 4), "res5": (128, 2, 2)}
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2,) + s for k, s in expected.items()}
    assert model.output_shape() == {
        name: ShapeSpec(channels=c, stride=4 * 2**i)
        for i, (name, (c, _, _)) in enumerate(expected.items())
    }
    assert model.size_divisibility == 32


def test_out_features_subset_runs_only_needed_stages():
    model = D2SwinTransformer(out_features=["res3"], **TINY)
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3"] and out["res3"].shape == (1, 32, 8, 8)
    assert not hasattr(model, "norm0") and hasattr(model, "norm1")


def test_out_features_subset_builds_only_parameters_that_get_gradients():
    # DistributedDataParallel (find_unused_parameters=False) fails on any parameter without a
    # gradient: later stages and the last returned stage's patch merging must not exist.
    model = D2SwinTransformer(out_features=["res2", "res3"], **TINY)
    assert len(model.layers) == 2 and model.layers[1].downsample is None
    assert model.layers[0].downsample is not None
    out = model(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    full = D2SwinTransformer(**TINY)
    assert len(full.layers) == 4 and full.layers[3].downsample is None


def test_build_from_config_registry():
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.MODEL.SWIN.EMBED_DIM = 16
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 2, 1]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.FROZEN_STAGES = 1
    cfg.MODEL.SWIN.APE = True
    model = BACKBONE_REGISTRY.get("D2SwinTransformer")(cfg, ShapeSpec(channels=3))
    assert model.num_features == [16, 32, 64, 128] and model.layers[0].window_size == 7
    assert not model.absolute_pos_embed.requires_grad
    assert model.absolute_pos_embed.shape == (1, 16, 56, 56)
    out = model(torch.randn(1, 3, 40, 72))  # APE interpolated to 10 x 18 tokens
    assert out["res2"].shape == (1, 16, 10, 18)


# ----------------------------------------------------------------------- window attention
def test_relative_position_index_direct_construction():
    wh, ww = 3, 4
    index = relative_position_index((wh, ww))
    for a in range(wh * ww):
        for b in range(wh * ww):
            dy, dx = a // ww - b // ww, a % ww - b % ww
            assert index[a, b] == (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)
    assert index.max() == (2 * wh - 1) * (2 * ww - 1) - 1


def test_relative_position_bias_lookup():
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=3)
    table = block.attn.relative_position_bias_table
    bias = block.attn.relative_position_bias()
    for a in range(9):
        for b in range(9):
            dy, dx = a // 3 - b // 3, a % 3 - b % 3
            torch.testing.assert_close(bias[:, a, b], table[(dy + 2) * 5 + dx + 2])


def _axis_groups(length, window, shift):
    """Window id along one axis of the padded map: with a shift, windows start at ``shift``
    and the first ``shift`` positions form their own (partial) window; no wrap-around."""
    if shift == 0:
        return [i // window for i in range(length)]
    return [-1 if i < shift else (i - shift) // window for i in range(length)]


def reference_block(block, x, h, w):
    """Explicit per-token (shifted-)window attention of a block: every query attends to the
    keys of its window of the zero-padded map (padding tokens are keys, as in the official
    code), with bias table[(dy + ws - 1) * (2ws - 1) + dx + ws - 1]."""
    ws, shift, heads = block.window_size, block.shift_size, block.num_heads
    b, _, c = x.shape
    hd = c // heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    padded = x.new_zeros(b, hp, wp, c)
    padded[:, :h, :w] = block.norm1(x).view(b, h, w, c)
    q, k, v = block.attn.qkv(padded).view(b, hp, wp, 3, heads, hd).unbind(3)
    rows, cols = _axis_groups(hp, ws, shift), _axis_groups(wp, ws, shift)
    table = block.attn.relative_position_bias_table
    out = x.new_zeros(b, h, w, heads, hd)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                keys = [
                    (a, e)
                    for a in range(hp)
                    for e in range(wp)
                    if rows[a] == rows[i] and cols[e] == cols[j]
                ]
                for head in range(heads):
                    logits = torch.stack(
                        [
                            (q[n, i, j, head] * k[n, a, e, head]).sum() * block.attn.scale
                            + table[(i - a + ws - 1) * (2 * ws - 1) + (j - e + ws - 1), head]
                            for a, e in keys
                        ]
                    )
                    attn = logits.softmax(0)
                    out[n, i, j, head] = sum(p * v[n, a, e, head] for p, (a, e) in zip(attn, keys))
    x = x + block.attn.proj(out.reshape(b, h * w, c))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(
    "h,w,window,shift", [(5, 7, 3, 0), (5, 7, 3, 1), (7, 8, 4, 2), (2, 3, 3, 1), (6, 6, 3, 1)]
)
def test_block_matches_bruteforce_window_attention(h, w, window, shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=window, shift_size=shift)
    block = block.double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        block.attn.qkv.weight.normal_(0, 0.5)
    x = torch.randn(2, h * w, 8, dtype=torch.float64)
    layout = WindowLayout(h, w, window, shift, x.device)
    expected = reference_block(block, x, h, w)
    # with gradients (explicit attention) and without (fused scaled_dot_product_attention)
    torch.testing.assert_close(block(x, layout), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(block(x, layout), expected, rtol=1e-10, atol=1e-10)


def test_window_layout_round_trip_and_mask():
    layout = WindowLayout(5, 7, 3, 1, torch.device("cpu"))
    x = torch.randn(2, 35, 4)
    windows = layout.partition(x)
    assert windows.shape == (2 * 2 * 3, 9, 4)
    torch.testing.assert_close(layout.reverse(windows), x)
    assert (windows == 0).all(-1).sum() == 2 * (6 * 9 - 35)  # zero padding tokens
    # attention mask: 0 inside a region, -100 across (per window, symmetric)
    mask = layout.attn_mask
    assert mask.shape == (6, 9, 9) and set(mask.unique().tolist()) == {0.0, -100.0}
    torch.testing.assert_close(mask, mask.transpose(1, 2))
    assert (mask[0] == 0).all()  # first window lies inside one region


def test_stage_alternates_shift_and_drop_path_increases():
    model = SwinTransformer(
        embed_dim=8, depths=(2, 3), num_heads=(1, 2), window_size=4, drop_path_rate=0.5
    )
    shifts = [[blk.shift_size for blk in stage.blocks] for stage in model.layers]
    assert shifts == [[0, 2], [0, 2, 0]]
    rates = [
        blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0
        for stage in model.layers
        for blk in stage.blocks
    ]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.5, 5))


def test_activation_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    config = dict(
        embed_dim=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=3,
        out_indices=(1,),
        drop_path_rate=0.0,
    )
    plain = SwinTransformer(**config)
    ckpt = SwinTransformer(use_checkpoint=True, **config)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 23, 29)
    outs = []
    for model in (plain, ckpt):
        out = model(x)["res3"]
        out.square().sum().backward()
        outs.append((out, model.layers[0].blocks[1].attn.qkv.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- frozen stages
def test_frozen_stages():
    small = dict(embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2), window_size=3)
    model = SwinTransformer(ape=True, pretrain_img_size=32, frozen_stages=2, **small)
    model.train()
    frozen = ["patch_embed.", "absolute_pos_embed", "layers.0."]
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(tuple(frozen))), name
    assert not model.patch_embed.training and not model.layers[0].training
    assert model.layers[1].training and model.norm0.training
    only_embedding = SwinTransformer(frozen_stages=0, **small)
    assert [n for n, p in only_embedding.named_parameters() if not p.requires_grad] == [
        f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")
    ]


# ------------------------------------------------------------------------ names / checkpoints
@pytest.mark.parametrize("ape", [False, True])
def test_state_dict_names_are_official(ape):
    model = D2SwinTransformer(ape=ape, pretrain_img_size=64, **TINY)
    sd = model.state_dict()
    assert set(sd) == official_swin_keys(TINY["depths"], ape=ape)
    assert sd["layers.2.blocks.1.attn.qkv.weight"].shape == (3 * 64, 64)
    assert sd["layers.2.blocks.1.attn.relative_position_bias_table"].shape == (25, 2)
    assert sd["layers.2.blocks.1.attn.relative_position_index"].shape == (9, 9)
    assert sd["layers.1.downsample.reduction.weight"].shape == (64, 128)
    assert sd["layers.0.blocks.0.mlp.fc1.weight"].shape == (64, 16)
    if ape:
        assert sd["absolute_pos_embed"].shape == (1, 16, 16, 16)


class _Wrapper(nn.Module):
    """A meta-architecture stand-in: the backbone under ``backbone.``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _fake_official_imagenet_checkpoint(model: SwinTransformer):
    """The layout of an official Swin ImageNet checkpoint: backbone weights without the output
    norms, plus the final norm, classifier head and attn_mask buffers of the shifted blocks."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    last = model.num_features[-1]
    sd.update(
        {
            "norm.weight": torch.rand(last),
            "norm.bias": torch.rand(last),
            "head.weight": torch.rand(10, last),
            "head.bias": torch.rand(10),
        }
    )
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            if blk.shift_size:
                n = blk.window_size**2
                sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, n, n)
    return sd


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_converter_round_trip(tmp_path):
    source = _randomised(SwinTransformer(**TINY))
    src = tmp_path / "swin_official.pth"
    torch.save({"model": _fake_official_imagenet_checkpoint(source)}, src)
    dst = tmp_path / "out" / "swin_d2.pth"
    convert_swin_checkpoint(str(src), str(dst))
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {"model", "__author__"}
    assert all(k.startswith("backbone.") for k in saved["model"])
    final_norm = ("backbone.norm.weight", "backbone.norm.bias")
    assert not [k for k in saved["model"] if "attn_mask" in k or "head." in k or k in final_norm]

    target = _Wrapper(D2SwinTransformer(**TINY))
    incompatible = target.load_state_dict(saved["model"], strict=False)
    assert incompatible.unexpected_keys == []
    output_norms = [f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(incompatible.missing_keys) == sorted(output_norms)
    for name, value in source.state_dict().items():
        if not name.startswith("norm"):
            torch.testing.assert_close(target.backbone.state_dict()[name], value)
    # through Detectron2's checkpointer (the MODEL.WEIGHTS path)
    loaded = _Wrapper(D2SwinTransformer(**TINY))
    DetectionCheckpointer(loaded).load(str(dst))
    torch.testing.assert_close(
        loaded.backbone.layers[3].blocks[1].attn.qkv.weight,
        source.layers[3].blocks[1].attn.qkv.weight,
    )


def test_converter_resizes_bias_tables(tmp_path):
    source = _randomised(SwinTransformer(**TINY))  # window 3
    src = tmp_path / "swin_w3.pth"
    torch.save({"model": _fake_official_imagenet_checkpoint(source)}, src)
    dst = tmp_path / "swin_w5.pth"
    convert_swin_checkpoint(str(src), str(dst), window_size=5)
    target = _Wrapper(D2SwinTransformer(**dict(TINY, window_size=5)))
    incompatible = target.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=False)
    assert incompatible.unexpected_keys == []
    assert all(k.startswith("backbone.norm") for k in incompatible.missing_keys)
    old = source.layers[1].blocks[0].attn.relative_position_bias_table  # 5 x 5 offsets
    new = target.backbone.layers[1].blocks[0].attn.relative_position_bias_table  # 9 x 9 offsets
    assert new.shape == (81, 2)
    # the zero offset (centre of the grid) keeps its bias exactly
    torch.testing.assert_close(new[4 * 9 + 4], old[2 * 5 + 2])


def test_bias_table_interpolation_properties():
    table = torch.randn(25, 3)
    torch.testing.assert_close(interpolate_relative_position_bias_table(table, 3), table)
    constant = torch.full((25, 3), 0.7)
    resized = interpolate_relative_position_bias_table(constant, 6)
    torch.testing.assert_close(resized, torch.full((121, 3), 0.7))
    with pytest.raises(ValueError):
        interpolate_relative_position_bias_table(torch.randn(24, 3), 4)


def test_d2_converted_pkl_loads_with_matching_heuristics(tmp_path):
    """The official "D2-converted" Swin pkl files: the raw ImageNet state dict (no prefix,
    numpy arrays) with matching heuristics."""
    source = _randomised(SwinTransformer(**TINY))
    raw = {k: v.numpy() for k, v in _fake_official_imagenet_checkpoint(source).items()}
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": raw, "__author__": "third_party", "matching_heuristics": True}, f)
    target = _Wrapper(D2SwinTransformer(**TINY))
    DetectionCheckpointer(target).load(str(path))
    for name, value in source.state_dict().items():
        if not name.startswith("norm"):
            torch.testing.assert_close(target.backbone.state_dict()[name], value, msg=name)


def test_official_mask2former_names_load_strictly():
    """A Mask2Former checkpoint holds ``backbone.`` + the official names: strict load."""
    model = _Wrapper(D2SwinTransformer(**TINY))
    official = {"backbone." + k: torch.zeros(()) for k in official_swin_keys(TINY["depths"])}
    assert set(model.state_dict()) == set(official)


def test_converter_rejects_non_swin_files(tmp_path):
    not_swin = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, not_swin)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("hello")
    for path in (not_swin, garbage):
        with pytest.raises(ValueError, match=str(path)):
            convert_swin_checkpoint(str(path), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()
    assert not list(tmp_path.glob(".swin_convert_*"))


def test_converter_cli(tmp_path, capsys):
    from mask2former.cli.convert_swin import main

    src = tmp_path / "swin.pth"
    torch.save({"model": _fake_official_imagenet_checkpoint(SwinTransformer(**TINY))}, src)
    assert main([str(src), str(tmp_path / "d2.pth"), "--window-size", "5"]) == 0
    converted = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    table = converted["backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (81, 1)
    assert main([str(ROOT / "README.md"), str(tmp_path / "x.pth")]) == 1
    assert "README.md" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pth")]) == 1
    assert not (tmp_path / "x.pth").exists()
