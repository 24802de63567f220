"""LowPrecisionWeights: the weights autocast casts at every low-precision inference forward, cast
once and kept. The outputs must be those of autocast alone, exactly; layers running outside
autocast keep float32 weights; any change of a parameter is seen at the next forward."""

import functools
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from dinat import add_dinat_config
from mask2former.engine import setup as engine_setup
from mask2former.engine.ema import ModelEMA
from mask2former.modeling.low_precision import LowPrecisionWeights
from semask import add_semask_config

build_cfg = functools.partial(
    engine_setup.build_cfg, add_configs=(add_semask_config, add_dinat_config)
)
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CONFIGS = {
    "m2f": TINY / "m2f_swin_tiny_cpu.yaml",
    "semask": TINY / "semask_swin_tiny_cpu.yaml",
    "dinat": TINY / "m2f_dinat_tiny_cpu.yaml",
}
BF16 = torch.bfloat16


class _Float32Island(nn.Module):
    """A linear layer run with autocast disabled (like a backbone's float32 first convolution)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.layer(x.float())


def _toy():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return nn.Sequential(
        nn.Linear(5, 6),  # 0: under autocast
        _Float32Island(nn.Linear(6, 6)),  # 1: outside
        shared,  # 2: under autocast, but shared with 4
        nn.Linear(6, 6).double(),  # 3: float64 weights (autocast does not cast them)
        _Float32Island(shared),  # 4: the shared layer outside autocast
        nn.Linear(6, 4),  # 5: under autocast
        nn.Conv1d(1, 2, 3),  # 6: never runs
    )


def _toy_forward(net, x):
    x = net[2](net[1](net[0](x)))
    x = net[3](x.double()).float()
    return net[5](net[4](x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _toy()

    def forward(self, x):
        return _toy_forward(self.net, x)


def test_only_float32_weights_of_layers_always_under_autocast_are_kept_cast():
    model = _Toy()
    x = torch.randn(3, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected = model(x)
        kept = LowPrecisionWeights(model, BF16)
        first = kept(x)
        assert kept.names == ("net.0.weight", "net.0.bias", "net.5.weight", "net.5.bias")
        seen = {}

        def note(layer, inputs):
            seen["dtype"] = layer.weight.dtype

        hook = model.net[5].register_forward_pre_hook(note)
        second = kept(x)
        hook.remove()
    assert seen["dtype"] == BF16  # the kept copy is what the layer used
    assert model.net[5].weight.dtype == torch.float32  # the parameter itself is unchanged
    assert torch.equal(first, expected) and torch.equal(second, expected)
    weights = kept.weights()
    assert all(w.dtype == BF16 for w in weights.values())
    assert all(kept.weights()[name] is w for name, w in weights.items())  # reused, not remade


class _StridedLinear(nn.Module):
    """A linear layer on a strided view (a crop of a padded map, as neighborhood attention's
    output projection gets it)."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        return self.proj(x[:, :8, :8])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_copies_take_the_product_route_of_autocasts_casts(mode):
    """Under no_grad autocast's casts of parameters require grad, under inference_mode not;
    PyTorch routes a linear layer on a strided input by it (on CPUs with oneDNN's bfloat16
    kernels the two routes round differently: for this input, differences of up to 4e-3 with
    the other route; without them, as on AVX2-only CPUs, both routes give the same values)."""
    torch.manual_seed(0)
    model = _StridedLinear(768)
    x = torch.randn(1, 11, 11, 768).to(BF16)
    kept = LowPrecisionWeights(model, BF16)
    with getattr(torch, mode)(), torch.autocast("cpu", dtype=BF16):
        expected = model(x)
        kept(x)
        assert torch.equal(kept(x), expected)
    with torch.no_grad():
        plain = nn.functional.linear(x[:, :8, :8], kept._copies["proj.weight"].copy)
        other = nn.functional.linear(x[:, :8, :8], kept._copies["proj.weight"].copy_with_grad_flag)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not torch.equal(plain, other)  # the two routes differ here: the test can fail


def test_refused_with_gradients():
    kept = LowPrecisionWeights(_Toy(), BF16)
    with pytest.raises(RuntimeError, match="without gradients"):
        kept(torch.randn(3, 5))


def test_layers_under_another_autocast_dtype_are_not_cast():
    model = _Toy()
    x = torch.randn(3, 5)
    kept = LowPrecisionWeights(model, torch.float16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected = model(x)
        kept(x)
        assert kept.names == ()
        assert torch.equal(kept(x), expected)


def _autocast_outputs(model, inputs):
    """The model's semantic outputs with the backbone and head under autocast alone."""
    images = model.preprocess_image(inputs)
    with torch.autocast("cpu", dtype=BF16):
        outputs = model.network_outputs(images.tensor)
    outputs = dict(
        outputs,
        pred_logits=outputs["pred_logits"].float(),
        pred_masks=outputs["pred_masks"].float(),
    )
    return model.inference(outputs, inputs, images)[0]["sem_seg"]


def _build(name, seed=0):
    cfg = build_cfg(str(CONFIGS[name]), ["MODEL.DEVICE", "cpu", "MODEL.PRECISION", "bf16"])
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _inputs(size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    return [{"image": image, "height": size, "width": size}]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_inference_outputs_equal_autocast_alone(name):
    model = _build(name)
    inputs = _inputs()
    with torch.inference_mode():
        expected = _autocast_outputs(model, inputs)
        first = model(inputs)[0]["sem_seg"]  # records the layers
        second = model(inputs)[0]["sem_seg"]  # with the kept copies
    assert torch.equal(first, expected) and torch.equal(second, expected)
    backbone, head = model._low_precision_network
    # most of the weights are kept cast; the float32 image convolution and readout are not
    kept = {f"backbone.{n}" for n in backbone.names} | {f"sem_seg_head.{n}" for n in head.names}
    params = dict(model.named_parameters())
    cast = sum(params[n].numel() for n in kept)
    assert cast > 0.7 * sum(p.numel() for p in model.backbone.parameters())
    stem, blocks = "backbone.patch_embed.proj.weight", "backbone.layers"
    if name == "dinat":
        stem, blocks = "backbone.patch_embed.proj.0.weight", "backbone.levels"
    assert stem in params and stem not in kept
    assert "sem_seg_head.predictor.class_embed.weight" not in kept
    assert f"{blocks}.0.blocks.0.mlp.fc1.weight" in kept
    assert all(w.dtype == BF16 for w in backbone.weights().values())


def test_parameter_changes_are_seen_at_the_next_forward():
    model = _build("m2f")
    inputs = _inputs()
    other = _build("m2f", seed=5)
    fc1 = model.backbone.layers[0].blocks[0].mlp.fc1
    with torch.no_grad():
        model(inputs)
        model(inputs)
        outputs = []
        fc1.weight.mul_(1.5)  # in place (an optimizer step, an EMA swap)
        outputs.append((model(inputs), _autocast_outputs(model, inputs)))
        model.load_state_dict(other.state_dict())  # copies into the parameters
        outputs.append((model(inputs), _autocast_outputs(model, inputs)))
        fc1.weight.data = torch.randn_like(fc1.weight)  # another storage
        outputs.append((model(inputs), _autocast_outputs(model, inputs)))
    previous = None
    for actual, expected in outputs:
        assert torch.equal(actual[0]["sem_seg"], expected)
        assert previous is None or not torch.equal(expected, previous)  # each change mattered
        previous = expected


def test_evaluation_under_ema_weights_and_back():
    """The EMA evaluation's swap (copies into the parameters, and back on exit): each bf16
    evaluation sees the weights the model holds at that moment."""
    model = _build("m2f")
    inputs = _inputs()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for t in ema.shadow.values():
            if t.is_floating_point():
                t.mul_(0.9)
        own_before = model(inputs)[0]["sem_seg"]
        model(inputs)
        with ema.applied_to(model):
            under_ema = model(inputs)[0]["sem_seg"]
            expected_ema = _autocast_outputs(model, inputs)
        own_after = model(inputs)[0]["sem_seg"]
        expected_own = _autocast_outputs(model, inputs)
    assert torch.equal(under_ema, expected_ema) and not torch.equal(under_ema, own_before)
    assert torch.equal(own_after, expected_own) and torch.equal(own_before, expected_own)


def test_training_mode_drops_the_copies_and_gradients_bypass_them():
    model = _build("m2f")
    inputs = _inputs()
    with torch.no_grad():
        model(inputs)
    assert model._low_precision_network is not None
    model.train()
    assert model._low_precision_network is None
    model.eval()
    # an eval forward with gradients runs autocast alone: the gradients reach the parameters
    scores = model(inputs)[0]["sem_seg"]
    assert model._low_precision_network is None
    scores.sum().backward()
    grad = model.backbone.layers[0].blocks[0].mlp.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
