"""MODEL.PRECISION (bf16 / fp16 inference) and MODEL.COMPILE (torch.compile for inference) on the
tiny configs: bf16 outputs against fp32 ones of the same weights, where autocast reaches (and does
not reach) in the pixel decoder and the transformer decoder's readout, refused values, training
unaffected, compiled against eager."""

import functools
import re
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import Backbone
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from dinat import add_dinat_config
from mask2former.engine import setup as engine_setup
from mask2former.inference.predictor import calibrate
from mask2former.modeling.meta_arch import MaskFormer
from mask2former.modeling.meta_arch.mask_former_model import inference_autocast_dtype
from mask2former.modeling.pixel_decoder import deformable_attention as deform
from mask2former.modeling.transformer_decoder import (
    mask2former_transformer_decoder as decoder_module,
)
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    masked_attention_mask,
)
from semask import add_semask_config

build_cfg = functools.partial(
    engine_setup.build_cfg, add_configs=(add_semask_config, add_dinat_config)
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
TINY_M2F = str(TINY / "m2f_swin_tiny_cpu.yaml")
TINY_CONFIGS = [TINY_M2F, str(TINY / "semask_swin_tiny_cpu.yaml")]
TINY_CONFIGS += [str(TINY / "m2f_dinat_tiny_cpu.yaml")]
# bf16 vs fp32 on a 128x128 random image (seed 3), class logits x CLASS_LOGIT_SCALE, measured on
# an AVX-512/AMX CPU (the transformer decoder reads its queries out in float32 under bf16):
# argmax agreement 1.0 on the three tiny models; masked-attention decisions (mask sigmoid >= 0.5)
# of bf16 differ from fp32's on 0.3% (m2f), 0.6% (SeMask), 0.8% (DiNAT) of the entries (up to
# 2.1% over image seeds 1-4): freshly initialised masks sit near the threshold. Each flip is a
# discrete change of what a query attends to, so probabilities are compared with bf16 replaying
# fp32's decisions: within 0.0002 (m2f), 0.0070 (SeMask), 0.0003 (DiNAT), over seeds 1-4 within
# 0.0084 (end to end, up to 0.069).
MIN_AGREEMENT = 0.99
PROB_TOL = 0.03
MAX_ATTENTION_FLIPS = 0.03
# Freshly initialised class logits are nearly uniform: every class scores about the same, and
# the argmax of such ties is decided by rounding. Scaled up, the decisions have margins.
CLASS_LOGIT_SCALE = 10.0


def build(config, *opts, weights_from=None, seed=0):
    """A model of ``config`` on CPU (random init from ``seed``, or ``weights_from``'s weights)."""
    cfg = build_cfg(config, ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(seed)
    model = build_model(cfg)
    if weights_from is not None:
        model.load_state_dict(weights_from.state_dict())
    return model


def random_inputs(size=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    return [{"image": image, "height": size, "width": size}]


@torch.no_grad()
def predict(model, inputs):
    return model.eval()(inputs)[0]["sem_seg"]


class _AttentionMasks:
    """Stands in for ``masked_attention_mask`` of the transformer decoder: records the masks it
    makes (``replay`` None), or hands out ``replay``'s masks in order instead of making them."""

    def __init__(self, replay=None):
        self.masks = []
        self.replay = None if replay is None else iter(replay.masks)

    def __call__(self, mask_logits):
        if self.replay is not None:
            mask = next(self.replay)
            assert mask.shape == mask_logits.flatten(2).shape
        else:
            mask = masked_attention_mask(mask_logits)
        self.masks.append(mask)
        return mask


def _predict_with(attention_masks, model, inputs, monkeypatch):
    monkeypatch.setattr(decoder_module, "masked_attention_mask", attention_masks)
    return predict(model, inputs)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=["m2f", "semask", "dinat"])
def test_bf16_inference_agrees_with_fp32(config, monkeypatch):
    fp32 = build(config)
    with torch.no_grad():
        fp32.sem_seg_head.predictor.class_embed.weight.mul_(CLASS_LOGIT_SCALE)
    bf16 = build(config, "MODEL.PRECISION", "bf16", weights_from=fp32)
    inputs = random_inputs(seed=3)
    fp32_masks, bf16_masks = _AttentionMasks(), _AttentionMasks()
    expected = _predict_with(fp32_masks, fp32, inputs, monkeypatch)
    actual = _predict_with(bf16_masks, bf16, inputs, monkeypatch)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert not torch.equal(actual, expected)  # bf16 really ran
    probs = calibrate(expected)
    top2 = probs.topk(2, dim=0).values
    # the fp32 decisions are not ties that any rounding would flip
    assert ((top2[0] - top2[1]) > 2 * PROB_TOL).float().mean().item() >= MIN_AGREEMENT
    agreement = (actual.argmax(0) == expected.argmax(0)).float().mean().item()
    assert agreement >= MIN_AGREEMENT
    # end to end, bf16 makes nearly the same masked-attention decisions
    assert len(bf16_masks.masks) == len(fp32_masks.masks) > 0
    flips = sum((a != b).sum().item() for a, b in zip(bf16_masks.masks, fp32_masks.masks))
    assert flips / sum(m.numel() for m in fp32_masks.masks) <= MAX_ATTENTION_FLIPS
    # with fp32's decisions, bf16's probabilities are close everywhere
    replayed = _predict_with(_AttentionMasks(replay=fp32_masks), bf16, inputs, monkeypatch)
    assert (calibrate(replayed) - probs).abs().max().item() <= PROB_TOL


class _EmbeddingBagDtypes(TorchFunctionMode):
    """Records the dtypes of the table and per-sample weights of every ``F.embedding_bag`` call
    (the deformable-attention sampling of the "fast" implementation; the test adds the calls of
    the "cpu" kernels)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding_bag:
            self.dtypes.append((args[1].dtype, kwargs["per_sample_weights"].dtype))
        return func(*args, **kwargs)


def _output_dtypes(modules):
    """Forward hooks recording the output dtype of each module; returns (dtypes, handles)."""
    dtypes, handles = {}, []

    def record(name, module, inputs, output):
        dtypes.setdefault(name, output.dtype)

    for name, module in modules.items():
        handles.append(module.register_forward_hook(functools.partial(record, name)))
    return dtypes, handles


def _pixel_decoder_layers(model):
    decoder = model.sem_seg_head.pixel_decoder
    layer = decoder.transformer.encoder.layers[0]
    return {
        "value_proj": layer.self_attn.value_proj,
        "ffn": layer.linear1,
        "fpn_conv": decoder.output_convs[0],
        "mask_features": decoder.mask_features,
    }


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_bf16_reaches_pixel_decoder_layers_but_not_the_sampling(impl, monkeypatch):
    model = build(
        TINY_M2F,
        "MODEL.PRECISION",
        "bf16",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL",
        impl,
    )
    assert model.sem_seg_head.pixel_decoder.inference_autocast
    dtypes, handles = _output_dtypes(_pixel_decoder_layers(model))
    sampling = _EmbeddingBagDtypes()
    real = deform.ms_deform_attn_cpu_logits

    def record_kernel_dtypes(value, shapes, ref_pixel, offsets, logits):
        sampling.dtypes.append((value.dtype, logits.dtype))
        return real(value, shapes, ref_pixel, offsets, logits)

    monkeypatch.setattr(deform, "ms_deform_attn_cpu_logits", record_kernel_dtypes)
    with sampling:
        predict(model, random_inputs(64))
    for handle in handles:
        handle.remove()
    assert dtypes == dict.fromkeys(_pixel_decoder_layers(model), torch.bfloat16)
    # one sampling call per encoder layer, on float32 values and weights (or logits)
    assert sampling.dtypes == [(torch.float32, torch.float32)] * 2


# per backbone config: the convolution that reads the image (kept in float32 under bf16) and a
# later layer that does run in bf16
_STEMS = {
    "swin": (TINY_M2F, "patch_embed.proj", "layers.0.blocks.0.attn.qkv"),
    "dinat": (TINY_CONFIGS[2], "patch_embed.proj.0", "patch_embed.proj.1"),
}


@pytest.mark.parametrize("backbone", sorted(_STEMS))
def test_bf16_reads_the_image_in_float32(backbone):
    """bfloat16 would round the normalised image itself (8 significant bits): the first
    convolution takes float32 input and weights and matches the fp32 model's to fp32 rounding."""
    config, stem_name, later_name = _STEMS[backbone]
    fp32 = build(config).eval()
    bf16 = build(config, "MODEL.PRECISION", "bf16", weights_from=fp32).eval()
    seen = {}

    def record(tag, module, inputs, output):
        seen[tag] = (inputs[0].dtype, output.dtype, output.detach().clone())

    modules = dict(bf16.backbone.named_modules())
    handles = [
        modules[stem_name].register_forward_hook(functools.partial(record, "stem")),
        modules[later_name].register_forward_hook(functools.partial(record, "later")),
        dict(fp32.backbone.named_modules())[stem_name].register_forward_hook(
            functools.partial(record, "fp32 stem")
        ),
    ]
    inputs = random_inputs(64)
    predict(bf16, inputs)
    predict(fp32, inputs)
    for handle in handles:
        handle.remove()
    assert seen["stem"][:2] == (torch.float32, torch.float32)
    assert seen["later"][1] == torch.bfloat16
    torch.testing.assert_close(seen["stem"][2], seen["fp32 stem"][2], rtol=1e-5, atol=1e-5)


def test_transformer_decoder_reads_out_in_float32_under_bf16_inference_only():
    """bf16 inference: the decoder's layers run in bf16, its readout (norm, class and mask
    heads, attention-mask logits) in float32; a training forward under autocast (AMP) keeps
    the readout in bf16."""
    model = build(TINY_M2F, "MODEL.PRECISION", "bf16")
    decoder = model.sem_seg_head.predictor
    layers = {
        "ffn": decoder.transformer_ffn_layers[0].linear1,
        "class_embed": decoder.class_embed,
        "mask_embed": decoder.mask_embed.layers[-1],
    }
    dtypes, handles = _output_dtypes(layers)
    predict(model, random_inputs(64))
    for handle in handles:
        handle.remove()
    assert dtypes == {
        "ffn": torch.bfloat16,
        "class_embed": torch.float32,
        "mask_embed": torch.float32,
    }
    # the attention masks come from float32 mask logits
    logits_dtypes = []
    real = decoder_module.masked_attention_mask

    def record(mask_logits):
        logits_dtypes.append(mask_logits.dtype)
        return real(mask_logits)

    decoder_module.masked_attention_mask = record
    try:
        predict(model, random_inputs(64))
    finally:
        decoder_module.masked_attention_mask = real
    assert logits_dtypes and set(logits_dtypes) == {torch.float32}
    # training under autocast: the readout too runs in bf16
    features = [torch.randn(1, 64, s, s) for s in (2, 4, 8)]  # CONVS_DIM of the tiny config
    mask_features = torch.randn(1, decoder.mask_embed.layers[-1].out_features, 16, 16)
    dtypes, handles = _output_dtypes({"class_embed": decoder.class_embed})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.train()(features, mask_features)
    for handle in handles:
        handle.remove()
    assert dtypes == {"class_embed": torch.bfloat16}


def test_fp32_pixel_decoder_ignores_an_enclosing_autocast():
    """Without MODEL.PRECISION the decoder keeps the official all-fp32 policy."""
    model = build(TINY_M2F).eval()
    assert not model.sem_seg_head.pixel_decoder.inference_autocast
    dtypes, handles = _output_dtypes(_pixel_decoder_layers(model))
    images = model.preprocess_image(random_inputs(64)).tensor
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.network_outputs(images)
    for handle in handles:
        handle.remove()
    assert dtypes == dict.fromkeys(_pixel_decoder_layers(model), torch.float32)


def test_unknown_and_cpu_fp16_precisions_are_refused():
    with pytest.raises(ValueError, match="MODEL.PRECISION must be one of .*'bf17'"):
        build(TINY_M2F, "MODEL.PRECISION", "bf17")
    with pytest.raises(ValueError, match="MODEL.PRECISION 'fp16' is CUDA only.*'cpu'"):
        build(TINY_M2F, "MODEL.PRECISION", "fp16")
    # built for CUDA, run on CPU: refused at the forward
    cfg = build_cfg(TINY_M2F, ["MODEL.DEVICE", "cuda", "MODEL.PRECISION", "fp16"])
    model = MaskFormer(**MaskFormer.from_config(cfg)).eval()
    with pytest.raises(ValueError, match="'fp16' is CUDA only"):
        predict(model, random_inputs(64))
    assert inference_autocast_dtype("fp16", "cuda") == torch.float16
    assert inference_autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert inference_autocast_dtype("fp32", "cpu") is None


def _training_inputs(size=64):
    inputs = random_inputs(size)
    label = torch.zeros(size, size, dtype=torch.int64)
    label[8:40, 16:56] = 3
    instances = Instances((size, size))
    instances.gt_classes = torch.tensor([0, 3])
    instances.gt_masks = torch.stack([label == 0, label == 3])
    inputs[0].update(instances=instances, sem_seg=label)
    return inputs


def test_training_is_unaffected_by_precision_and_compile():
    """bf16 + compile models train exactly as the fp32 eager one (the same losses, eagerly, with
    the pixel decoder in fp32 under an AMP autocast, as before)."""
    reference = build(TINY_M2F).train()
    model = build(
        TINY_M2F, "MODEL.PRECISION", "bf16", "MODEL.COMPILE", "True", weights_from=reference
    ).train()
    inputs = _training_inputs()
    losses = []
    for m in (reference, model):
        torch.manual_seed(3)  # point sampling
        losses.append({k: v.item() for k, v in m(inputs).items()})
    assert losses[0] == losses[1]
    assert model._compiled_network_outputs is None
    dtypes, handles = _output_dtypes(_pixel_decoder_layers(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs)
    for handle in handles:
        handle.remove()
    assert dtypes == dict.fromkeys(_pixel_decoder_layers(model), torch.float32)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=["m2f", "semask", "dinat"])
def test_compiled_network_is_one_graph(config):
    """MODEL.COMPILE's network traces into one graph: no graph break (each one runs eagerly
    between two compiled pieces, and a break inside a repeated block makes every block's resumed
    frame a recompilation, past Dynamo's limit). Kernel-choice lookups with side effects (the CPU
    library load, logging a choice) are constants of the graph."""
    model = build(config).eval()
    images = model.preprocess_image(random_inputs(64)).tensor
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model.network_outputs)(images)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_compiled_inference_equals_eager():
    eager = build(TINY_M2F)
    compiled = build(TINY_M2F, "MODEL.COMPILE", "True", weights_from=eager)
    inputs = random_inputs(64)
    expected = predict(eager, inputs)
    actual = predict(compiled, inputs)
    assert compiled._compiled_network_outputs is not None
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


class _OneConvBackbone(Backbone):
    """A stand-in backbone (one strided convolution): cheap to compile."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return {"res2": torch.relu(self.conv(x))}

    def output_shape(self):
        return {"res2": ShapeSpec(channels=8, stride=4)}


class _TwoQueryHead(nn.Module):
    """A stand-in head: two queries, class logits from the pooled features, 1x1 mask logits."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Linear(8, 3)
        self.mask = nn.Conv2d(8, 2, 1)

    def forward(self, features):
        x = features["res2"]
        logits = self.cls(x.mean((2, 3)))[:, None].expand(-1, 2, -1)
        return {"pred_logits": logits, "pred_masks": self.mask(x) + 1}


def test_compilation_failure_names_the_cause():
    torch.manual_seed(0)
    model = MaskFormer(
        backbone=_OneConvBackbone(),
        sem_seg_head=_TwoQueryHead(),
        criterion=nn.Identity(),
        num_queries=2,
        size_divisibility=32,
        sem_seg_postprocess_before_inference=False,
        pixel_mean=[0.0] * 3,
        pixel_std=[1.0] * 3,
        compile_inference=True,
    )
    missing = "/nonexistent/c++"
    config = {"cpp.cxx": (None, missing), "fx_graph_cache": False}
    with torch._inductor.config.patch(config):
        expected = "MODEL.COMPILE: torch.compile failed.*" + re.escape(missing)
        with pytest.raises(RuntimeError, match=expected):
            predict(model, random_inputs(32))
