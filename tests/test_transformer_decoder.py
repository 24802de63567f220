"""Tests of the masked-attention multi-scale transformer decoder."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config
from torch.nn import functional as F

from mask2former.config import add_maskformer2_config
from mask2former.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    masked_attention_mask,
    multi_head_attention,
)

HIDDEN, QUERIES, HEADS, FFN, MASK_DIM, CLASSES = 32, 8, 4, 64, 24, 5
LEVEL_SIZES = [(2, 3), (4, 5), (8, 9)]  # lowest resolution first (odd sizes on purpose)
MASK_SIZE = (16, 18)


def make_decoder(dec_layers=3, in_channels=16, pre_norm=False, enforce_input_project=False):
    torch.manual_seed(0)
    return MultiScaleMaskedTransformerDecoder(
        in_channels,
        num_classes=CLASSES,
        hidden_dim=HIDDEN,
        num_queries=QUERIES,
        nheads=HEADS,
        dim_feedforward=FFN,
        dec_layers=dec_layers,
        pre_norm=pre_norm,
        mask_dim=MASK_DIM,
        enforce_input_project=enforce_input_project,
    )


def make_inputs(batch=2, in_channels=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, in_channels, *s, generator=g) for s in LEVEL_SIZES]
    mask_features = torch.randn(batch, MASK_DIM, *MASK_SIZE, generator=g)
    return feats, mask_features


def official_state_dict_listing(dec_layers, in_channels):
    """Parameter names and shapes of the official MultiScaleMaskedTransformerDecoder."""
    listing = {}
    attn = {
        "in_proj_weight": (3 * HIDDEN, HIDDEN),
        "in_proj_bias": (3 * HIDDEN,),
        "out_proj.weight": (HIDDEN, HIDDEN),
        "out_proj.bias": (HIDDEN,),
    }
    norm = {"norm.weight": (HIDDEN,), "norm.bias": (HIDDEN,)}
    for i in range(dec_layers):
        for prefix, name in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            for k, v in attn.items():
                listing[f"{prefix}.{i}.{name}.{k}"] = v
            for k, v in norm.items():
                listing[f"{prefix}.{i}.{k}"] = v
        ffn = {
            "linear1.weight": (FFN, HIDDEN),
            "linear1.bias": (FFN,),
            "linear2.weight": (HIDDEN, FFN),
            "linear2.bias": (HIDDEN,),
            **norm,
        }
        for k, v in ffn.items():
            listing[f"transformer_ffn_layers.{i}.{k}"] = v
    listing.update(
        {
            "decoder_norm.weight": (HIDDEN,),
            "decoder_norm.bias": (HIDDEN,),
            "query_feat.weight": (QUERIES, HIDDEN),
            "query_embed.weight": (QUERIES, HIDDEN),
            "level_embed.weight": (3, HIDDEN),
            "class_embed.weight": (CLASSES + 1, HIDDEN),
            "class_embed.bias": (CLASSES + 1,),
            "mask_embed.layers.0.weight": (HIDDEN, HIDDEN),
            "mask_embed.layers.0.bias": (HIDDEN,),
            "mask_embed.layers.1.weight": (HIDDEN, HIDDEN),
            "mask_embed.layers.1.bias": (HIDDEN,),
            "mask_embed.layers.2.weight": (MASK_DIM, HIDDEN),
            "mask_embed.layers.2.bias": (MASK_DIM,),
        }
    )
    if in_channels is not None:
        for lvl in range(3):
            listing[f"input_proj.{lvl}.weight"] = (HIDDEN, in_channels, 1, 1)
            listing[f"input_proj.{lvl}.bias"] = (HIDDEN,)
    return listing


@pytest.mark.parametrize(
    "in_channels, enforce, projected",
    [(16, False, True), (HIDDEN, False, False), (HIDDEN, True, True)],
)
def test_state_dict_matches_official_listing(in_channels, enforce, projected):
    decoder = make_decoder(2, in_channels, enforce_input_project=enforce)
    got = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert got == official_state_dict_listing(2, in_channels if projected else None)
    assert len(list(decoder.pe_layer.parameters())) == 0


def test_output_shapes_and_aux_outputs():
    decoder = make_decoder(dec_layers=4)
    feats, mask_features = make_inputs()
    decoder.train()
    out = decoder(feats, mask_features)
    assert out["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
    assert out["pred_masks"].shape == (2, QUERIES, *MASK_SIZE)
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
        assert aux["pred_masks"].shape == (2, QUERIES, *MASK_SIZE)

    decoder.eval()
    with torch.no_grad():
        fast = decoder(feats, mask_features)
        full = decoder(feats, mask_features, return_aux=True)
    assert fast["aux_outputs"] == [] and len(full["aux_outputs"]) == 4
    # skipping the intermediate full-resolution masks does not change the final prediction
    torch.testing.assert_close(fast["pred_logits"], full["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(fast["pred_masks"], full["pred_masks"], rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    decoder = make_decoder(dec_layers=3)
    feats, mask_features = make_inputs()
    decoder.train()
    out = decoder(feats, mask_features)
    loss = out["pred_logits"].square().mean() + out["pred_masks"].square().mean()
    for aux in out["aux_outputs"]:
        loss = loss + aux["pred_logits"].square().mean() + aux["pred_masks"].square().mean()
    loss.backward()
    missing = [
        n for n, p in decoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert missing == []


def masked_attention_mask_loops(mask_logits):
    """Direct computation: blocked where sigmoid < 0.5, rows blocked everywhere un-blocked."""
    batch, queries = mask_logits.shape[:2]
    flat = mask_logits.flatten(2)
    out = torch.zeros(batch, queries, flat.shape[-1], dtype=torch.bool)
    for b in range(batch):
        for q in range(queries):
            row = [bool(torch.sigmoid(v) < 0.5) for v in flat[b, q]]
            if all(row):
                row = [False] * len(row)
            out[b, q] = torch.tensor(row)
    return out


def test_masked_attention_mask_function():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 3, 4, generator=g)
    logits[0, 1] = -torch.rand(3, 4, generator=g) - 0.1  # fully off: must be un-masked
    logits[1, 4] = torch.rand(3, 4, generator=g) + 0.1  # fully on
    logits[1, 2] = -1.0
    logits[1, 2, 2, 3] = 0.5  # a single allowed pixel
    mask = masked_attention_mask(logits)
    assert mask.dtype == torch.bool and mask.shape == (2, 5, 12)
    assert torch.equal(mask, masked_attention_mask_loops(logits))
    assert not mask[0, 1].any()
    assert mask[1, 2].sum().item() == 11


@pytest.mark.parametrize("with_mask", [False, True])
def test_multi_head_attention_equals_nn_multihead_attention(with_mask):
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True).eval()
    query = torch.randn(2, 7, HIDDEN)
    key = torch.randn(2, 11, HIDDEN)
    value = torch.randn(2, 11, HIDDEN)
    mask = None
    if with_mask:
        mask = torch.rand(2, 7, 11) < 0.6
        mask[mask.all(-1)] = False
    got = multi_head_attention(attn, query, key, value, mask)
    # nn.MultiheadAttention wants the mask repeated per head, batch-major
    repeated = None if mask is None else mask.repeat_interleave(HEADS, dim=0)
    expected = attn(query, key, value, attn_mask=repeated, need_weights=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def capture_attention_masks(decoder):
    captured = []

    def hook(module, args):
        captured.append(args[2])

    layers = decoder.transformer_cross_attention_layers
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    return captured, handles


@pytest.mark.parametrize("pre_norm", [False, True])
def test_masks_used_by_cross_attention_match_official_construction(pre_norm):
    """Layer i attends to scale i % 3 with the mask of prediction i resized (bilinear) to it."""
    decoder = make_decoder(dec_layers=5, pre_norm=pre_norm).eval()
    feats, mask_features = make_inputs(seed=4)
    captured, handles = capture_attention_masks(decoder)
    with torch.no_grad():
        out = decoder(feats, mask_features, return_aux=True)
    for h in handles:
        h.remove()
    predictions = [aux["pred_masks"] for aux in out["aux_outputs"]] + [out["pred_masks"]]
    assert len(captured) == 5
    for i, mask in enumerate(captured):
        resized = F.interpolate(
            predictions[i], size=LEVEL_SIZES[i % 3], mode="bilinear", align_corners=False
        )
        expected = masked_attention_mask_loops(resized)
        # the decoder resizes the mask features instead (same linear map): only logits
        # within rounding distance of 0 may differ
        ambiguous = (resized.abs() < 1e-4).flatten(2)
        assert mask.shape == expected.shape
        assert torch.equal(mask[~ambiguous], expected[~ambiguous])
        assert not mask.all(dim=-1).any()


def test_all_masked_rows_are_unmasked_inside_the_decoder():
    decoder = make_decoder(dec_layers=3).eval()
    # every query predicts the same mask: -(channel 0 of the mask features) = negative everywhere
    with torch.no_grad():
        decoder.mask_embed.layers[2].weight.zero_()
        decoder.mask_embed.layers[2].bias.zero_()
        decoder.mask_embed.layers[2].bias[0] = -1.0
    feats, mask_features = make_inputs()
    mask_features[:, 0] = mask_features[:, 0].abs() + 0.1
    captured, handles = capture_attention_masks(decoder)
    with torch.no_grad():
        out = decoder(feats, mask_features)
    for h in handles:
        h.remove()
    assert (out["pred_masks"] < 0).all()
    assert len(captured) == 3
    assert all(not m.any() for m in captured)  # rows that would be fully blocked attend anywhere


def test_masked_attention_changes_the_result():
    # with masks that block part of the pixels, the cross-attention output must differ from
    # unmasked attention (guards against a mask that is built but not used)
    decoder = make_decoder(dec_layers=1).eval()
    feats, mask_features = make_inputs(seed=6)
    captured, handles = capture_attention_masks(decoder)
    with torch.no_grad():
        masked = decoder(feats, mask_features)["pred_logits"]
    for h in handles:
        h.remove()
    assert captured[0].any()
    # a pre-hook replacing the (positional) attention mask by None
    handle = decoder.transformer_cross_attention_layers[0].register_forward_pre_hook(
        lambda module, args: (*args[:2], None, *args[3:])
    )
    with torch.no_grad():
        unmasked = decoder(feats, mask_features)["pred_logits"]
    handle.remove()
    assert (masked - unmasked).abs().max() > 1e-4


def test_build_from_config_and_registry():
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = CLASSES
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = MASK_DIM
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = HIDDEN
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = QUERIES
    cfg.MODEL.MASK_FORMER.NHEADS = HEADS
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = FFN
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 4
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    assert "MultiScaleMaskedTransformerDecoder" in TRANSFORMER_DECODER_REGISTRY
    decoder = build_transformer_decoder(cfg, 16, mask_classification=True)
    assert isinstance(decoder, MultiScaleMaskedTransformerDecoder)
    assert decoder.num_layers == 3
    assert set(decoder.state_dict()) == set(official_state_dict_listing(3, 16))
    feats, mask_features = make_inputs()
    assert len(decoder.train()(feats, mask_features)["aux_outputs"]) == 3
    with pytest.raises(ValueError):
        build_transformer_decoder(cfg, 16, mask_classification=False)


def test_full_resolution_masks_of_all_predictions_in_one_product():
    """The S predictions' mask logits from one product equal each prediction's own einsum, and
    so do the gradients of the embeddings and of the (shared) mask features."""
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    features = torch.randn(2, 8, 6, 7, generator=g, dtype=torch.float64)
    weights = [torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    results = {}
    for name in ("one product", "per prediction"):
        leaves = [e.clone().requires_grad_() for e in embeds]
        feats = features.clone().requires_grad_()
        if name == "one product":
            masks = MultiScaleMaskedTransformerDecoder._full_resolution_masks(leaves, feats)
        else:
            masks = [torch.einsum("bqc,bchw->bqhw", e, feats) for e in leaves]
        sum((m * w).sum() for m, w in zip(masks, weights)).backward()
        results[name] = (masks, [e.grad for e in leaves], feats.grad)
    (masks, embed_grads, feature_grad), (ref_masks, ref_embed_grads, ref_feature_grad) = (
        results["one product"],
        results["per prediction"],
    )
    assert len(masks) == 3 and all(m.shape == (2, 5, 6, 7) for m in masks)
    for got, want in zip(masks + embed_grads, ref_masks + ref_embed_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feature_grad, ref_feature_grad, rtol=1e-12, atol=1e-12)
    # one prediction (inference): its product alone
    single = MultiScaleMaskedTransformerDecoder._full_resolution_masks(embeds[:1], features)
    torch.testing.assert_close(single[0], ref_masks[0].detach(), rtol=1e-12, atol=1e-12)
