"""SeMask: semantic attention (windowed / global) against a direct float64 computation, the backbone
wiring, shapes and class maps, the semantic branch head, the branch cross-entropy, official
parameter names (end to end through train_net.py: tests/test_train_net.py)."""

import functools
import math
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
    build_model,
)
from detectron2.structures import Instances
from torch.nn import functional as F

from dinat import add_dinat_config
from mask2former.engine import setup as engine_setup
from semask import (
    BRANCH_OUTPUT_KEY,
    BranchMaskFormerHead,
    D2SeMaskSwinTransformer,
    SemanticAttention,
    SemanticBranchHead,
    SemanticLayer,
    SeMaskMaskFormer,
    add_semask_config,
    pad_sem_seg_targets,
    seg_map_key,
    semantic_branch_loss,
    split_seg_maps,
)

# the configuration train_net.py builds: Mask2Former + SeMask + DiNAT keys
build_cfg = functools.partial(
    engine_setup.build_cfg, add_configs=(add_semask_config, add_dinat_config)
)

ROOT = Path(__file__).resolve().parents[1]
TINY_SEMASK = str(ROOT / "configs" / "tiny" / "semask_swin_tiny_cpu.yaml")
TINY_M2F = str(ROOT / "configs" / "tiny" / "m2f_swin_tiny_cpu.yaml")
TINY = dict(
    embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3, drop_path_rate=0.0
)
IGNORE = 255


# ------------------------------------------------------------------------ float64 references
def reference_attention(block, x):
    """Official SemanticAttention on one group of tokens x [N, C], written out."""
    q = x @ block.mlp_cls_q.weight.T + block.mlp_cls_q.bias
    k = x @ block.mlp_cls_k.weight.T + block.mlp_cls_k.bias
    v = x @ block.mlp_v.weight.T + block.mlp_v.bias
    scores = q @ k.T
    scores = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
    attn = scores / scores.sum(dim=1, keepdim=True)
    feats = (attn @ v) @ block.mlp_res.weight.T + block.mlp_res.bias
    return q, x + block.gamma * feats


def reference_semantic_layer(layer, x, h, w):
    """norm1, zero padding to window multiples, per-window (or whole-map) blocks, crop."""
    b, _, c = x.shape
    norm = layer.norm1
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    xn = ((x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias).view(b, h, w, c)
    k = layer.num_classes
    if layer.windowed:
        wsh = wsw = layer.window_size
        hp, wp = math.ceil(h / wsh) * wsh, math.ceil(w / wsw) * wsw
    else:  # one group: the whole map
        wsh, wsw, hp, wp = h, w, h, w
    padded = x.new_zeros(b, hp, wp, c)
    padded[:, :h, :w] = xn
    out_x, out_s = x.new_zeros(b, hp, wp, c), x.new_zeros(b, hp, wp, k)
    for bi in range(b):
        for i0 in range(0, hp, wsh):
            for j0 in range(0, wp, wsw):
                tokens = padded[bi, i0 : i0 + wsh, j0 : j0 + wsw].reshape(-1, c)
                for block in layer.class_injection:
                    seg, tokens = reference_attention(block, tokens)
                out_x[bi, i0 : i0 + wsh, j0 : j0 + wsw] = tokens.view(wsh, wsw, c)
                out_s[bi, i0 : i0 + wsh, j0 : j0 + wsw] = seg.view(wsh, wsw, k)
    return out_s[:, :h, :w].reshape(b, h * w, k), out_x[:, :h, :w].reshape(b, h * w, c)


def randomize_semantic(module, seed=0):
    """Non-zero gamma and mlp_res (the official init has both at 0), random norm1 affine."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(
            mod for mod in module.modules() if isinstance(mod, SemanticAttention)
        ):
            m.gamma.fill_(0.5 + 0.25 * i)
            m.mlp_res.weight.copy_(torch.randn(m.mlp_res.weight.shape, generator=gen) * 0.3)
            m.mlp_res.bias.copy_(torch.randn(m.mlp_res.bias.shape, generator=gen) * 0.1)
        for m in module.modules():
            if isinstance(m, SemanticLayer):
                m.norm1.weight.copy_(1 + 0.1 * torch.randn(m.norm1.weight.shape, generator=gen))
                m.norm1.bias.copy_(0.1 * torch.randn(m.norm1.bias.shape, generator=gen))


def resize_matrix_align_corners(n_in, n_out):
    """[n_out, n_in] 1-D bilinear resize with corners aligned, from its definition."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        pos = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(pos)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = pos - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def resize_ac(x, h, w):
    """[B, K, H, W] -> [B, K, h, w] with the separable matrices above."""
    mh = resize_matrix_align_corners(x.shape[-2], h)
    mw = resize_matrix_align_corners(x.shape[-1], w)
    return torch.einsum("ih,bkhw,jw->bkij", mh, x, mw)


# ------------------------------------------------------------------------ configs
def test_config_defaults_and_first_place_configs():
    cfg = build_cfg()
    assert (cfg.MODEL.SWIN.SEM_WINDOW_SIZE, cfg.MODEL.SWIN.NUM_SEM_BLOCKS) == (
        7,
        1,
    )  # official defaults
    assert cfg.MODEL.MASK_FORMER.CATE_WEIGHT == 0.4 and list(cfg.MODEL.SWIN.SEM_GLOBAL_STAGES) == []
    for name, embed_dim in (("semask_swin_l.yaml", 192), ("semask_swin_b.yaml", 128)):
        cfg = build_cfg(str(ROOT / "configs" / name))
        assert cfg.MODEL.META_ARCHITECTURE == "SeMaskMaskFormer"
        assert cfg.MODEL.BACKBONE.NAME == "D2SeMaskSwinTransformer"
        assert cfg.MODEL.SEM_SEG_HEAD.NAME == "BranchMaskFormerHead"
        assert cfg.MODEL.SWIN.EMBED_DIM == embed_dim and cfg.MODEL.SWIN.WINDOW_SIZE == 12
        assert (cfg.MODEL.SWIN.SEM_WINDOW_SIZE, cfg.MODEL.SWIN.NUM_SEM_BLOCKS) == (12, 1)
        assert cfg.MODEL.MASK_FORMER.CATE_WEIGHT == 0.4 and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 11
        assert list(cfg.INPUT.MIN_SIZE_TRAIN) == list(range(256, 1025, 32))


# ------------------------------------------------------------------------ semantic attention
def test_semantic_attention_is_identity_at_init():
    torch.manual_seed(0)
    block = SemanticAttention(dim=8, num_classes=5).double()
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    for mode in (True, False):  # dropout active or not: the residual is exactly zero
        block.train(mode)
        seg_map, out = block(x)
        assert torch.equal(out, x)
        torch.testing.assert_close(
            seg_map, x @ block.mlp_cls_q.weight.T + block.mlp_cls_q.bias, rtol=0, atol=1e-12
        )
    assert block.gamma.item() == 0 and not block.mlp_res.weight.any()


def test_semantic_attention_matches_formula_with_nonzero_gamma():
    torch.manual_seed(1)
    block = SemanticAttention(dim=8, num_classes=5).double().eval()
    randomize_semantic(block)
    x = torch.randn(4, 12, 8, dtype=torch.float64)
    seg_map, out = block(x)
    for g in range(x.shape[0]):
        ref_seg, ref_out = reference_attention(block, x[g])
        torch.testing.assert_close(seg_map[g], ref_seg, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[g], ref_out, rtol=0, atol=1e-12)
    assert (out - x).abs().max() > 0.1  # the residual is really there


def test_official_init_gives_no_gradient_to_the_residual():
    """Characterises the official initialisation: gamma and mlp_res both 0 -> neither learns."""
    torch.manual_seed(2)
    block = SemanticAttention(dim=8, num_classes=5)
    seg_map, out = block(torch.randn(2, 6, 8))
    (seg_map.square().sum() + out.square().sum()).backward()
    assert block.gamma.grad.abs().max() == 0 and block.mlp_res.weight.grad.abs().max() == 0
    assert block.mlp_cls_q.weight.grad.abs().max() > 0


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("num_sem_blocks", [1, 2])
def test_semantic_layer_matches_reference(windowed, num_sem_blocks):
    torch.manual_seed(3)
    h, w, c, k = 5, 7, 8, 4  # not multiples of the window: padding takes part as keys
    layer = SemanticLayer(c, k, window_size=3, num_sem_blocks=num_sem_blocks, windowed=windowed)
    layer = layer.double().eval()
    randomize_semantic(layer)
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    seg_map, out = layer(x, h, w)
    ref_seg, ref_out = reference_semantic_layer(layer, x, h, w)
    assert seg_map.shape == (2, h * w, k) and out.shape == (2, h * w, c)
    torch.testing.assert_close(seg_map, ref_seg, rtol=0, atol=1e-11)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-11)


def test_windowed_and_global_semantic_layers_differ():
    torch.manual_seed(4)
    layer = SemanticLayer(8, 4, window_size=3, windowed=True).double().eval()
    randomize_semantic(layer)
    x = torch.randn(1, 36, 8, dtype=torch.float64)
    _, windowed = layer(x, 6, 6)
    layer.windowed = False
    _, global_ = layer(x, 6, 6)
    assert (windowed - global_).abs().max() > 1e-3


# ------------------------------------------------------------------------ backbone
def test_backbone_shapes_strides_and_class_maps_for_odd_sizes():
    torch.manual_seed(5)
    model = D2SeMaskSwinTransformer(num_classes=5, sem_window_size=3, **TINY)
    out = model(torch.randn(2, 3, 37, 53))
    sizes = {"res2": (10, 14), "res3": (5, 7), "res4": (3, 4), "res5": (2, 2)}
    expected = {name: (2, 16 * 2**i) + hw for i, (name, hw) in enumerate(sizes.items())}
    expected.update({seg_map_key(name): (2, 5) + hw for name, hw in sizes.items()})
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert model.output_shape() == {
        name: ShapeSpec(channels=16 * 2**i, stride=4 * 2**i) for i, name in enumerate(sizes)
    }
    features, seg_maps = split_seg_maps(out)
    assert list(features) == list(sizes) and list(seg_maps) == list(sizes)
    assert model.size_divisibility == 32


def test_backbone_wiring_matches_reference():
    """Stage blocks -> semantic layer -> (output norm, patch merging), class maps of the layer."""
    torch.manual_seed(6)
    model = D2SeMaskSwinTransformer(num_classes=4, sem_window_size=2, sem_global_stages=[3], **TINY)
    model = model.double().eval()
    randomize_semantic(model)
    assert [layer.semantic_layer.windowed for layer in model.layers] == [True, True, True, False]
    image = torch.randn(1, 3, 45, 30, dtype=torch.float64)
    out = model(image)
    with torch.no_grad():
        x, h, w = model.forward_embed(image)
        for i, stage in enumerate(model.layers):
            x = stage.forward_blocks(x, h, w)
            ref_seg, x = reference_semantic_layer(stage.semantic_layer, x, h, w)
            ref_out = getattr(model, f"norm{i}")(x).view(1, h, w, -1).permute(0, 3, 1, 2)
            torch.testing.assert_close(out[f"res{i + 2}"], ref_out, rtol=0, atol=1e-10)
            torch.testing.assert_close(
                out[seg_map_key(f"res{i + 2}")],
                ref_seg.view(1, h, w, 4).permute(0, 3, 1, 2),
                rtol=0,
                atol=1e-10,
            )
            x, h, w = stage.forward_downsample(x, h, w)


def test_backbone_out_features_subset_and_from_config():
    cfg = build_cfg(
        TINY_SEMASK,
        [
            "MODEL.SWIN.OUT_FEATURES",
            "['res3', 'res5']",
            "MODEL.SWIN.SEM_GLOBAL_STAGES",
            "[2]",
            "MODEL.SWIN.NUM_SEM_BLOCKS",
            "2",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            "7",
        ],
    )
    model = BACKBONE_REGISTRY.get("D2SeMaskSwinTransformer")(cfg, ShapeSpec(channels=3))
    assert [len(layer.semantic_layer.class_injection) for layer in model.layers] == [2, 2, 2, 2]
    assert [layer.semantic_layer.windowed for layer in model.layers] == [True, True, False, True]
    assert {layer.semantic_layer.window_size for layer in model.layers} == {4}
    out = model(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 64, 8, 8),
        seg_map_key("res3"): (1, 7, 8, 8),
        "res5": (1, 256, 2, 2),
        seg_map_key("res5"): (1, 7, 2, 2),
    }
    with pytest.raises(ValueError, match="no stage"):
        D2SeMaskSwinTransformer(num_classes=3, sem_global_stages=[4], **TINY)


def official_semask_backbone_shapes(embed_dim, depths, num_classes, num_sem_blocks):
    """Names and shapes of the parameters the official SeMask backbone adds to Swin
    (BasicLayer.semantic_layer = SWSeMaskBlock / SeMaskBlock: norm1, class_injection)."""
    shapes = {}
    for i in range(len(depths)):
        c = embed_dim * 2**i
        prefix = f"layers.{i}.semantic_layer."
        shapes[prefix + "norm1.weight"] = (c,)
        shapes[prefix + "norm1.bias"] = (c,)
        for j in range(num_sem_blocks):
            p = f"{prefix}class_injection.{j}."
            shapes.update(
                {
                    p + "mlp_cls_q.weight": (num_classes, c),
                    p + "mlp_cls_q.bias": (num_classes,),
                    p + "mlp_cls_k.weight": (num_classes, c),
                    p + "mlp_cls_k.bias": (num_classes,),
                    p + "mlp_v.weight": (c, c),
                    p + "mlp_v.bias": (c,),
                    p + "mlp_res.weight": (c, c),
                    p + "mlp_res.bias": (c,),
                    p + "gamma": (1,),
                }
            )
    return shapes


def official_swin_block_names(depths):
    names = {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "patch_embed.norm.weight",
        "patch_embed.norm.bias",
    }
    block = [
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
        names |= {f"layers.{i}.blocks.{j}.{p}" for j in range(depth) for p in block}
        if i < len(depths) - 1:
            names |= {
                f"layers.{i}.downsample.{p}"
                for p in ("reduction.weight", "norm.weight", "norm.bias")
            }
    return names | {f"norm{i}.{p}" for i in range(len(depths)) for p in ("weight", "bias")}


@pytest.mark.parametrize("num_sem_blocks", [1, 2])
def test_backbone_state_dict_has_official_names_and_loads_strictly(num_sem_blocks):
    model = D2SeMaskSwinTransformer(num_classes=11, num_sem_blocks=num_sem_blocks, **TINY)
    semantic = official_semask_backbone_shapes(16, TINY["depths"], 11, num_sem_blocks)
    state = model.state_dict()
    assert set(state) == official_swin_block_names(TINY["depths"]) | set(semantic)
    assert {k: tuple(state[k].shape) for k in semantic} == semantic
    # an "official" checkpoint (those names and shapes) loads with nothing missing or unexpected
    gen = torch.Generator().manual_seed(0)
    checkpoint = {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(
        model.layers[2].semantic_layer.class_injection[0].gamma,
        checkpoint["layers.2.semantic_layer.class_injection.0.gamma"],
    )


def test_full_model_adds_only_the_backbone_semantic_layers():
    """SeMaskMaskFormer = Mask2Former + the backbone semantic layers (the branch head has no
    parameters), as in the official code."""
    torch.manual_seed(0)
    semask = build_model(build_cfg(TINY_SEMASK, ["MODEL.DEVICE", "cpu"]))
    m2f = build_model(build_cfg(TINY_M2F, ["MODEL.DEVICE", "cpu"]))
    assert type(semask) is SeMaskMaskFormer and type(semask.sem_seg_head) is BranchMaskFormerHead
    semantic = official_semask_backbone_shapes(32, (1, 1, 2, 1), 11, 1)
    assert set(semask.state_dict()) == set(m2f.state_dict()) | {"backbone." + k for k in semantic}
    assert not list(semask.sem_seg_head.sem_head.parameters())
    assert META_ARCH_REGISTRY.get("SeMaskMaskFormer") is SeMaskMaskFormer
    assert SEM_SEG_HEADS_REGISTRY.get("BranchMaskFormerHead") is BranchMaskFormerHead


# ------------------------------------------------------------------------ branch head
def test_branch_head_matches_reference_on_odd_sizes():
    torch.manual_seed(7)
    sizes = [(17, 13), (9, 7), (5, 4), (3, 2)]
    maps = [torch.randn(2, 3, h, w, dtype=torch.float64) for h, w in sizes]
    out = SemanticBranchHead([4, 8, 16, 32])(maps)
    expected = maps[0].clone()
    for i, m in enumerate(maps[1:], start=1):
        for _ in range(i):  # successive x2 upsamplings, corners aligned
            m = resize_ac(m, 2 * m.shape[-2], 2 * m.shape[-1])
        expected = expected + resize_ac(m, 17, 13)
    expected = resize_ac(expected, 68, 52)
    assert out.shape == (2, 3, 68, 52)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # successive x2 steps are not one resize (the official structure is kept)
    direct = maps[0] + sum(resize_ac(m, 17, 13) for m in maps[1:])
    assert (resize_ac(direct, 68, 52) - out).abs().max() > 1e-3


def test_branch_head_rejects_bad_strides():
    with pytest.raises(ValueError):
        SemanticBranchHead([4, 12])
    with pytest.raises(ValueError):
        SemanticBranchHead([8, 4])


# ------------------------------------------------------------------------ branch loss
def test_branch_loss_honours_ignore_label_and_equals_hand_computation():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 3, (2, 4, 5), generator=gen)
    targets[0, 0] = IGNORE
    targets[1, :, 3:] = IGNORE
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(5):
                t = int(targets[b, i, j])
                if t == IGNORE:
                    continue
                z = logits[b, :, i, j].detach()
                total += -(z[t] - torch.logsumexp(z, 0)).item()
                count += 1
    loss = semantic_branch_loss(logits, targets, IGNORE)
    assert loss.dtype == torch.float32  # computed in fp32 like the other losses
    assert loss.item() == pytest.approx(total / count, rel=1e-6)
    loss.backward()
    ignored = (targets == IGNORE).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0 and logits.grad[~ignored].abs().max() > 0
    # all pixels ignored: 0, not NaN
    empty = semantic_branch_loss(logits, torch.full_like(targets, IGNORE), IGNORE)
    assert empty.item() == 0.0


def test_pad_sem_seg_targets():
    a, b = torch.zeros(3, 2, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    out = pad_sem_seg_targets([a, b], (4, 4), IGNORE)
    assert out.shape == (2, 4, 4) and out.dtype == torch.long
    assert (
        (out[0, :3, :2] == 0).all()
        and (out[0, 3:] == IGNORE).all()
        and (out[0, :, 2:] == IGNORE).all()
    )
    assert (out[1, :2] == 1).all() and (out[1, 2:] == IGNORE).all()
    with pytest.raises(ValueError):
        pad_sem_seg_targets([torch.zeros(5, 5, dtype=torch.long)], (4, 4), IGNORE)


def _instances(sem_seg):
    inst = Instances(tuple(sem_seg.shape))
    classes = torch.unique(sem_seg)
    classes = classes[classes != IGNORE]
    inst.gt_classes = classes
    inst.gt_masks = sem_seg[None] == classes[:, None, None]
    return inst


def test_meta_arch_adds_weighted_branch_loss_on_padded_targets():
    cfg = build_cfg(
        TINY_SEMASK,
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.SWIN.DROP_PATH_RATE",
            "0.0",
            "MODEL.MASK_FORMER.DROPOUT",
            "0.0",
            "MODEL.MASK_FORMER.CATE_WEIGHT",
            "0.25",
        ],
    )
    torch.manual_seed(9)
    model = build_model(cfg).train()
    gen = torch.Generator().manual_seed(9)
    inputs = []
    for h, w in ((60, 50), (64, 64)):  # padded to 64 x 64 (size divisibility 32)
        sem_seg = torch.randint(0, 11, (h, w), generator=gen)
        sem_seg[: h // 3, : w // 2] = IGNORE
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        inputs.append({"image": image, "sem_seg": sem_seg, "instances": _instances(sem_seg)})
    losses = model(inputs)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_cate"} <= set(losses)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        branch = model.sem_seg_head.forward_branch(model.backbone(images.tensor))
    assert branch.shape == (2, 11, 64, 64)
    logp = F.log_softmax(branch.double(), dim=1)
    nll, count = 0.0, 0
    for b, x in enumerate(inputs):
        h, w = x["sem_seg"].shape
        t = x["sem_seg"]
        valid = t != IGNORE  # padding (outside h x w) is ignored too
        picked = logp[b, :, :h, :w].gather(0, t.clamp(max=10)[None])[0]
        nll -= picked[valid].sum().item()
        count += int(valid.sum())
    assert losses["loss_cate"].item() == pytest.approx(0.25 * nll / count, rel=1e-5)
    losses["loss_cate"].backward()
    q = model.backbone.layers[0].semantic_layer.class_injection[0].mlp_cls_q.weight
    assert q.grad is not None and q.grad.abs().max() > 0


def test_branch_is_not_computed_at_inference_and_needs_semask_backbone():
    cfg = build_cfg(TINY_SEMASK, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    features = model.backbone(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        assert BRANCH_OUTPUT_KEY not in model.sem_seg_head(features)
        assert model.sem_seg_head.forward_branch(features).shape == (1, 11, 64, 64)
    plain, _ = split_seg_maps(features)
    with pytest.raises(KeyError, match="D2SeMaskSwinTransformer"):
        model.sem_seg_head.forward_branch(plain)


# ------------------------------------------------------------------------ end to end
