"""MSDeformAttn pixel decoder: shapes / strides for odd sizes, official names, config, padding
masks, determinism; the sine position embedding against its formula."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import add_deeplab_config

from mask2former.config import add_maskformer2_config
from mask2former.modeling.backbone.swin import D2SwinTransformer
from mask2former.modeling.pixel_decoder.msdeformattn import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
)
from mask2former.modeling.position_encoding import PositionEmbeddingSine

CHANNELS = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
INPUT_SHAPE = {
    k: ShapeSpec(channels=c, stride=4 * 2**i) for i, (k, c) in enumerate(CHANNELS.items())
}
CONV_DIM, MASK_DIM, LAYERS = 32, 16, 2


def make_decoder(impl="fast", seed=0, enc_layers=LAYERS):
    torch.manual_seed(seed)
    return MSDeformAttnPixelDecoder(
        INPUT_SHAPE,
        transformer_dropout=0.0,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=enc_layers,
        conv_dim=CONV_DIM,
        mask_dim=MASK_DIM,
        norm="GN",
        transformer_in_features=["res3", "res4", "res5"],
        common_stride=4,
        attention_impl=impl,
    ).eval()


def features_of_image(h, w, batch=2, seed=0):
    """Feature maps of an h x w image (sizes rounded up at every stride, as the backbone)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, math.ceil(h / (4 * 2**i)), math.ceil(w / (4 * 2**i)), generator=g)
        for i, (k, c) in enumerate(CHANNELS.items())
    }


# ------------------------------------------------------------------------ position embedding
def sine_reference(mask, num_feats, normalize, temperature=10000.0, scale=2 * math.pi):
    b, h, w = mask.shape
    out = torch.zeros(b, 2 * num_feats, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                y = float((~mask[n, : i + 1, j]).sum())
                x = float((~mask[n, i, : j + 1]).sum())
                if normalize:
                    y = y / (float((~mask[n, :, j]).sum()) + 1e-6) * scale
                    x = x / (float((~mask[n, i, :]).sum()) + 1e-6) * scale
                for c in range(num_feats):
                    freq = temperature ** (2 * (c // 2) / num_feats)
                    trig = math.sin if c % 2 == 0 else math.cos
                    out[n, c, i, j] = trig(y / freq)
                    out[n, num_feats + c, i, j] = trig(x / freq)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_position_embedding_formula(normalize):
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    pe = PositionEmbeddingSine(num_pos_feats=6, normalize=normalize)
    x = torch.zeros(2, 3, 4, 5)
    got = pe(x, mask)
    assert got.shape == (2, 12, 4, 5) and got.dtype == torch.float32 and not list(pe.parameters())
    expected = sine_reference(mask, 6, normalize)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pe(x), pe(x, torch.zeros_like(mask)))
    with pytest.raises(ValueError):
        PositionEmbeddingSine(scale=1.0)


# -------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("size", [(100, 131), (64, 64), (33, 97)])
def test_output_shapes_and_strides_for_odd_sizes(size):
    h, w = size
    decoder = make_decoder()
    with torch.no_grad():
        outputs = decoder.forward_features(features_of_image(h, w))
    mask_features, encoder_features, multi_scale = outputs
    ceil = lambda s: (math.ceil(h / s), math.ceil(w / s))  # noqa: E731
    assert mask_features.shape == (2, MASK_DIM) + ceil(4)
    assert encoder_features.shape == (2, CONV_DIM) + ceil(32)
    assert [tuple(f.shape) for f in multi_scale] == [(2, CONV_DIM) + ceil(s) for s in (32, 16, 8)]
    assert all(torch.isfinite(t).all() for t in [mask_features, encoder_features] + multi_scale)


def test_with_swin_backbone_features():
    backbone = D2SwinTransformer(
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=3
    )
    shapes = backbone.output_shape()
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(
        shapes,
        transformer_dropout=0.0,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=1,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["res3", "res4", "res5"],
        common_stride=4,
    )
    mask_features, _, multi_scale = decoder.forward_features(backbone(torch.randn(1, 3, 75, 90)))
    assert mask_features.shape == (1, 16, 19, 23)
    assert [f.shape[-2:] for f in multi_scale] == [(3, 3), (5, 6), (10, 12)]
    mask_features.mean().backward()  # gradients reach the backbone
    assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def official_decoder_keys(num_layers, num_levels=3, num_fpn=1):
    keys = ["transformer.level_embed", "mask_features.weight", "mask_features.bias"]
    params = ("weight", "bias")
    keys += [f"input_proj.{k}.{i}.{p}" for k in range(num_levels) for i in (0, 1) for p in params]
    attention = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    layer_params = [f"self_attn.{m}.{p}" for m in attention for p in params]
    layer_params += [f"{m}.{p}" for m in ("norm1", "linear1", "linear2", "norm2") for p in params]
    keys += [f"transformer.encoder.layers.{i}.{p}" for i in range(num_layers) for p in layer_params]
    for n in range(1, num_fpn + 1):
        keys += [f"adapter_{n}.weight", f"adapter_{n}.norm.weight", f"adapter_{n}.norm.bias"]
        keys += [f"layer_{n}.weight", f"layer_{n}.norm.weight", f"layer_{n}.norm.bias"]
    return set(keys)


def test_state_dict_names_are_official():
    sd = make_decoder().state_dict()
    assert set(sd) == official_decoder_keys(LAYERS)
    # input projections ordered from the lowest resolution (res5 first)
    assert [sd[f"input_proj.{k}.0.weight"].shape[1] for k in range(3)] == [48, 40, 24]
    assert sd["adapter_1.weight"].shape == (CONV_DIM, 16, 1, 1)
    assert sd["layer_1.weight"].shape == (CONV_DIM, CONV_DIM, 3, 3)
    offsets = sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"]
    assert offsets.shape == (4 * 3 * 4 * 2, CONV_DIM)
    assert sd["transformer.level_embed"].shape == (3, CONV_DIM)
    assert not sd["input_proj.0.0.bias"].any() and not sd["mask_features.bias"].any()


def _cfg():
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.CONVS_DIM, head.MASK_DIM, head.NORM, head.TRANSFORMER_ENC_LAYERS = 32, 16, "GN", 2
    return cfg


def test_from_config():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "pytorch"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 3
    decoder = SEM_SEG_HEADS_REGISTRY.get("MSDeformAttnPixelDecoder")(cfg, INPUT_SHAPE)
    layer = decoder.transformer.encoder.layers[1]
    assert layer.linear1.out_features == 1024  # the official hard-coded encoder FFN width
    attn = layer.self_attn
    assert attn.impl == "pytorch" and attn.n_points == 3 and attn.n_heads == 8
    assert set(decoder.state_dict()) == official_decoder_keys(2)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    with pytest.raises(ValueError, match="NHEADS"):
        MSDeformAttnPixelDecoder(cfg, INPUT_SHAPE)


def test_deterministic_and_impls_agree():
    feats = features_of_image(70, 90)
    a, b = make_decoder("fast"), make_decoder("fast")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        first = a.forward_features(feats)
        second = a.forward_features(feats)
        reference = make_decoder("pytorch").forward_features(feats)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch.testing.assert_close(first[0], reference[0], rtol=1e-4, atol=1e-5)
    for x, y in zip(first[2], reference[2]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_all_false_padding_mask_equals_no_mask():
    decoder = make_decoder()
    feats = features_of_image(70, 90)
    with torch.no_grad():
        plain = decoder.forward_features(feats)
        masked = decoder.forward_features(feats, torch.zeros(2, 70, 90, dtype=torch.bool))
    for x, y in zip([plain[0], plain[1]] + plain[2], [masked[0], masked[1]] + masked[2]):
        torch.testing.assert_close(x, y)


def test_padding_mask_makes_encoder_independent_of_padding():
    """An image padded into a larger batch map (garbage in the padding) gives, at its valid
    positions, exactly the encoder output of the image alone."""
    torch.manual_seed(0)
    encoder = (
        MSDeformAttnTransformerEncoderOnly(
            d_model=32,
            nhead=4,
            num_encoder_layers=2,
            dim_feedforward=64,
            dropout=0.0,
            num_feature_levels=3,
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for layer in encoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.3)
            layer.self_attn.attention_weights.weight.normal_(0, 0.3)
    pe = PositionEmbeddingSine(16, normalize=True)
    valid = [(3, 4), (5, 7), (10, 13)]
    padded = [(4, 6), (7, 9), (13, 17)]
    srcs = [torch.randn(1, 32, h, w, dtype=torch.float64) for h, w in valid]
    big_srcs, masks = [], []
    for src, (h, w), (hp, wp) in zip(srcs, valid, padded):
        big = 50 * torch.randn(1, 32, hp, wp, dtype=torch.float64)
        big[:, :, :h, :w] = src
        mask = torch.ones(1, hp, wp, dtype=torch.bool)
        mask[:, :h, :w] = False
        big_srcs.append(big)
        masks.append(mask)
    with torch.no_grad():
        alone, _, _ = encoder(srcs, [pe(s).double() for s in srcs])
        batch, _, _ = encoder(big_srcs, [pe(s, m).double() for s, m in zip(big_srcs, masks)], masks)
    start, big_start = 0, 0
    for (h, w), (hp, wp) in zip(valid, padded):
        expected = alone[0, start : start + h * w].view(h, w, 32)
        got = batch[0, big_start : big_start + hp * wp].view(hp, wp, 32)[:h, :w]
        # reference points are fp32 (official), hence fp32-level agreement; leaked padding
        # (values of magnitude 50) would show as O(1) differences
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        start, big_start = start + h * w, big_start + hp * wp


def test_decoder_with_padding_mask_ignores_padded_content_in_attention():
    decoder = make_decoder(enc_layers=1)
    feats = features_of_image(64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:, :] = True
    mask[1, :, 60:] = True
    with torch.no_grad():
        out = decoder.forward_features(feats, mask)
    assert out[0].shape == (2, MASK_DIM, 16, 24) and all(torch.isfinite(t).all() for t in out[2])
    # image 0 has no padding: same as running it alone without a mask
    single = {k: v[:1] for k, v in feats.items()}
    with torch.no_grad():
        alone = decoder.forward_features(single)
    torch.testing.assert_close(out[0][:1], alone[0], rtol=1e-5, atol=1e-5)
