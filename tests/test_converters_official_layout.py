"""The Swin and DiNAT converters on checkpoints in the official classification layouts.

The fake checkpoints are written from the architecture descriptions of the official
classification models (microsoft/Swin-Transformer ``models/swin_transformer.py``,
SHI-Labs/Neighborhood-Attention-Transformer ``classification/nat.py`` and ``dinat.py``), not from
this project's backbones: names, shapes, buffers, the final ``norm``, the ``head`` (1000 or 21841
classes) and the ``model`` / ``state_dict`` wrappers. Widths are narrowed to keep the test fast;
depths, heads, window and kernel sizes are those of the named models.
"""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from dinat.backbone import D2DiNAT
from dinat.convert import convert_dinat_checkpoint, interpolate_rpb
from mask2former.cli.convert_dinat import main as convert_dinat_main
from mask2former.modeling.backbone.swin import D2SwinTransformer
from mask2former.modeling.backbone.swin_convert import convert_swin_checkpoint

IMAGENET_22K_CLASSES = 21841
# Parameters of the Detectron2 backbones that no ImageNet checkpoint has: one norm per output.
OUTPUT_NORMS = sorted(f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))


class _Wrapper(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _filled(shapes, dtype=torch.float32):
    """Distinct values per tensor, so a tensor loaded into the wrong slot is noticed."""
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen, dtype=dtype) for name, shape in shapes.items()}


# ----------------------------------------------------------------------------- Swin
def official_swin_classification(embed_dim, depths, heads, window, img_size, num_classes):
    """State dict of the official Swin classifier ``SwinTransformer(img_size, patch_size=4,
    window_size, embed_dim, depths, num_heads, num_classes)``: parameters with shapes, plus the
    ``relative_position_index`` and ``attn_mask`` buffers (the mask only in shifted blocks)."""
    shapes = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    buffers = {}
    resolution = img_size // 4
    for i, depth in enumerate(depths):
        dim = embed_dim * 2**i
        # a stage no larger than the window uses one unshifted window of the stage's size
        w = min(window, resolution)
        shift = 0 if resolution <= window else window // 2
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (dim,),
                    p + "norm1.bias": (dim,),
                    p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads[i]),
                    p + "attn.qkv.weight": (3 * dim, dim),
                    p + "attn.qkv.bias": (3 * dim,),
                    p + "attn.proj.weight": (dim, dim),
                    p + "attn.proj.bias": (dim,),
                    p + "norm2.weight": (dim,),
                    p + "norm2.bias": (dim,),
                    p + "mlp.fc1.weight": (4 * dim, dim),
                    p + "mlp.fc1.bias": (4 * dim,),
                    p + "mlp.fc2.weight": (dim, 4 * dim),
                    p + "mlp.fc2.bias": (dim,),
                }
            )
            coords = torch.stack(
                torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
            ).flatten(1)
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
            buffers[p + "attn.relative_position_index"] = rel[..., 0] * (2 * w - 1) + rel[..., 1]
            if j % 2 == 1 and shift:
                windows = (resolution // w) ** 2
                buffers[p + "attn_mask"] = torch.zeros(windows, w * w, w * w)
        if i < len(depths) - 1:
            # PatchMerging: LayerNorm over the 4 concatenated neighbours, then Linear 4C -> 2C
            shapes[f"layers.{i}.downsample.norm.weight"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.norm.bias"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            resolution //= 2
    last = embed_dim * 2 ** (len(depths) - 1)
    shapes.update(
        {
            "norm.weight": (last,),
            "norm.bias": (last,),
            "head.weight": (num_classes, last),
            "head.bias": (num_classes,),
        }
    )
    return {**_filled(shapes), **buffers}


SWIN_MODELS = {
    # name: (embed_dim narrowed from 96 / 128 / 192, depths, heads, window, image size, classes)
    "swin_tiny_patch4_window7_224": (24, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, 1000),
    "swin_base_patch4_window12_384_22k": (
        32,
        (2, 2, 18, 2),
        (4, 8, 16, 32),
        12,
        384,
        IMAGENET_22K_CLASSES,
    ),
}


@pytest.mark.parametrize("name", sorted(SWIN_MODELS))
def test_swin_converter_official_classification_layout(tmp_path, name):
    embed_dim, depths, heads, window, img_size, classes = SWIN_MODELS[name]
    state = official_swin_classification(embed_dim, depths, heads, window, img_size, classes)
    assert any(k.endswith("attn_mask") for k in state)
    src = tmp_path / f"{name}.pth"
    torch.save({"model": state}, src)  # the official checkpoints wrap the state dict in "model"
    dst = tmp_path / "d2.pth"
    convert_swin_checkpoint(str(src), str(dst))

    backbone = D2SwinTransformer(
        pretrain_img_size=img_size,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        drop_path_rate=0.0,
    )
    target = _Wrapper(backbone)
    converted = torch.load(dst, weights_only=True)["model"]
    incompatible = target.load_state_dict(converted, strict=False)
    assert incompatible.unexpected_keys == []
    assert sorted(incompatible.missing_keys) == OUTPUT_NORMS
    loaded = target.backbone.state_dict()
    dropped = ("head.", "norm.")
    for key, value in state.items():
        if key.startswith(dropped) or key.endswith("attn_mask"):
            assert "backbone." + key not in converted, key
            continue
        assert torch.equal(loaded[key], value), key
    # through Detectron2's checkpointer (the MODEL.WEIGHTS path): no shape mismatch anywhere
    fresh = _Wrapper(
        D2SwinTransformer(
            pretrain_img_size=img_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=heads,
            window_size=window,
        )
    )
    DetectionCheckpointer(fresh).load(str(dst))
    for key in (
        "layers.0.blocks.1.attn.relative_position_bias_table",
        "layers.3.blocks.1.mlp.fc2.weight",
    ):
        assert torch.equal(fresh.backbone.state_dict()[key], state[key]), key


# ----------------------------------------------------------------------------- DiNAT
def official_dinat_classification(
    embed_dim, depths, heads, kernel, mlp_ratio, num_classes, layer_scale=False
):
    """State dict of the official ``NAT`` / ``DiNAT`` classifier: the ``ConvTokenizer``
    (``proj`` = two stride-2 3x3 convs, then a LayerNorm), per block ``norm1``, NATTEN's
    ``NeighborhoodAttention2D`` (``qkv``, ``rpb [heads, 2k-1, 2k-1]``, ``proj``), ``norm2``, the
    MLP and, with layer scale, ``gamma1/gamma2``; ``ConvDownsampler`` (bias-free conv + LayerNorm)
    between levels; the final ``norm`` and ``head``."""
    shapes = {
        "patch_embed.proj.0.weight": (embed_dim // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": (embed_dim // 2,),
        "patch_embed.proj.1.weight": (embed_dim, embed_dim // 2, 3, 3),
        "patch_embed.proj.1.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    for i, depth in enumerate(depths):
        dim, hidden = embed_dim * 2**i, int(embed_dim * 2**i * mlp_ratio)
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (dim,),
                    p + "norm1.bias": (dim,),
                    p + "attn.rpb": (heads[i], 2 * kernel - 1, 2 * kernel - 1),
                    p + "attn.qkv.weight": (3 * dim, dim),
                    p + "attn.qkv.bias": (3 * dim,),
                    p + "attn.proj.weight": (dim, dim),
                    p + "attn.proj.bias": (dim,),
                    p + "norm2.weight": (dim,),
                    p + "norm2.bias": (dim,),
                    p + "mlp.fc1.weight": (hidden, dim),
                    p + "mlp.fc1.bias": (hidden,),
                    p + "mlp.fc2.weight": (dim, hidden),
                    p + "mlp.fc2.bias": (dim,),
                }
            )
            if layer_scale:
                shapes[p + "gamma1"] = shapes[p + "gamma2"] = (dim,)
        if i < len(depths) - 1:
            shapes[f"levels.{i}.downsample.reduction.weight"] = (2 * dim, dim, 3, 3)
            shapes[f"levels.{i}.downsample.norm.weight"] = (2 * dim,)
            shapes[f"levels.{i}.downsample.norm.bias"] = (2 * dim,)
    last = embed_dim * 2 ** (len(depths) - 1)
    shapes.update(
        {
            "norm.weight": (last,),
            "norm.bias": (last,),
            "head.weight": (num_classes, last),
            "head.bias": (num_classes,),
        }
    )
    return _filled(shapes)


DINAT_L = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0)
DINAT_L_DILATIONS = [  # the Mask2Former DiNAT-L config's
    [1, 14, 1],
    [1, 4, 1, 7],
    [1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 3],
    [1, 1, 1, 1, 1],
]
DINAT_MODELS = {
    # name: (kernel, classes, wrapper); embed_dim narrowed from 192 to 48 (head dim 8)
    "dinat_large_in22k_224_11x11interp": (11, IMAGENET_22K_CLASSES, "model"),
    "dinat_large_in22k_in1k_384_11x11": (11, 1000, "state_dict"),
    "dinat_large_in22k_224": (7, IMAGENET_22K_CLASSES, None),
}


def _dinat_l(kernel, embed_dim=48):
    torch.manual_seed(1)
    return _Wrapper(
        D2DiNAT(
            embed_dim=embed_dim,
            kernel_size=kernel,
            dilations=DINAT_L_DILATIONS,
            drop_path_rate=0.0,
            **DINAT_L,
        )
    )


@pytest.mark.parametrize("name", sorted(DINAT_MODELS))
def test_dinat_converter_official_classification_layout(tmp_path, name):
    kernel, classes, wrapper = DINAT_MODELS[name]
    state = official_dinat_classification(
        48, DINAT_L["depths"], DINAT_L["num_heads"], kernel, DINAT_L["mlp_ratio"], classes
    )
    src = tmp_path / f"{name}.pth"
    torch.save(state if wrapper is None else {wrapper: state}, src)
    dst = tmp_path / "d2.pth"
    count, dropped = convert_dinat_checkpoint(str(src), str(dst))
    assert sorted(dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert count == len(state) - 4

    # the kernel-11 Mask2Former DiNAT-L backbone: every tensor fits, rpb tables included
    target = _dinat_l(kernel=11)
    converted = torch.load(dst, weights_only=True)["model"]
    if kernel == 11:
        incompatible = target.load_state_dict(converted, strict=False)
        assert incompatible.unexpected_keys == []
        assert sorted(incompatible.missing_keys) == OUTPUT_NORMS
        loaded = target.backbone.state_dict()
        for key, value in state.items():
            if not key.startswith(("head.", "norm.")):
                assert torch.equal(loaded[key], value), key
        assert loaded["levels.3.blocks.4.attn.rpb"].shape == (48, 21, 21)
    else:
        # a kernel-7 checkpoint: only the rpb tables differ in shape ([heads, 13, 13])
        mismatched = sorted(
            k for k, v in converted.items() if v.shape != target.state_dict()[k].shape
        )
        expected = sorted(
            f"backbone.levels.{i}.blocks.{j}.attn.rpb"
            for i, depth in enumerate(DINAT_L["depths"])
            for j in range(depth)
        )
        assert mismatched == expected
        before = target.backbone.levels[0].blocks[0].attn.rpb.detach().clone()
        DetectionCheckpointer(target).load(str(dst))  # skips them with a warning
        assert torch.equal(target.backbone.levels[0].blocks[0].attn.rpb, before)
        assert torch.equal(
            target.backbone.levels[2].blocks[17].mlp.fc1.weight,
            state["levels.2.blocks.17.mlp.fc1.weight"],
        )
        # and the kernel-7 model takes them
        same_kernel = _dinat_l(kernel=7)
        incompatible = same_kernel.load_state_dict(converted, strict=False)
        assert sorted(incompatible.missing_keys) == OUTPUT_NORMS
        assert incompatible.unexpected_keys == []


def test_dinat_converter_official_layer_scale_layout(tmp_path):
    """dinat_base has layer scale: ``gamma1/gamma2`` per block load as well."""
    kwargs = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32))
    state = official_dinat_classification(
        32, kwargs["depths"], kwargs["num_heads"], 7, 2.0, 1000, layer_scale=True
    )
    src = tmp_path / "dinat_base_in1k_224.pth"
    torch.save(state, src)
    convert_dinat_checkpoint(str(src), str(tmp_path / "d2.pth"))
    target = _Wrapper(
        D2DiNAT(embed_dim=32, kernel_size=7, mlp_ratio=2.0, layer_scale=1e-5, **kwargs)
    )
    incompatible = target.load_state_dict(
        torch.load(tmp_path / "d2.pth", weights_only=True)["model"], strict=False
    )
    assert incompatible.unexpected_keys == []
    assert sorted(incompatible.missing_keys) == OUTPUT_NORMS
    assert torch.equal(
        target.backbone.levels[1].blocks[3].gamma2, state["levels.1.blocks.3.gamma2"]
    )


def test_dinat_kernel7_checkpoint_resized_to_kernel11(tmp_path):
    """``--kernel-size 11``: the kernel-7 tables of dinat_large_in22k_224 are resized (bicubic)
    and the whole backbone loads into the kernel-11 model with nothing skipped."""
    state = official_dinat_classification(
        48, DINAT_L["depths"], DINAT_L["num_heads"], 7, DINAT_L["mlp_ratio"], 1000
    )
    src, dst = tmp_path / "dinat_large_in22k_224.pth", tmp_path / "d2.pth"
    torch.save({"model": state}, src)
    assert convert_dinat_main([str(src), str(dst), "--kernel-size", "11"]) == 0
    target = _dinat_l(kernel=11)
    incompatible = target.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=False)
    assert sorted(incompatible.missing_keys) == OUTPUT_NORMS
    old = state["levels.2.blocks.5.attn.rpb"]  # [24, 13, 13]
    new = target.backbone.levels[2].blocks[5].attn.rpb  # [24, 21, 21]
    assert new.shape == (24, 21, 21)
    torch.testing.assert_close(new[:, 10, 10], old[:, 6, 6])  # zero offset keeps its bias
    torch.testing.assert_close(
        interpolate_rpb(torch.full((2, 13, 13), 0.3), 11), torch.full((2, 21, 21), 0.3)
    )
    assert torch.equal(interpolate_rpb(old, 7), old)
    with pytest.raises(ValueError, match="2k-1"):
        interpolate_rpb(torch.zeros(2, 12, 12), 7)
