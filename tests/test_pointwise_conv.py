"""The 1x1 convolution as a matrix product (``pointwise_conv2d`` / ``PointwiseConv2d``): values
and gradients against float64 ``F.conv2d`` for NCHW, channels-last and strided inputs, with and
without bias, batch 1 and larger; the output layout follows the input's; under bf16 autocast
the product runs in bfloat16; the module is a drop-in for Detectron2's ``Conv2d`` (names, norm,
activation)."""

import pytest
import torch
from detectron2.layers import Conv2d
from torch.nn import functional as F

from mask2former.modeling.layers import PointwiseConv2d, pointwise_conv2d


def _layout(base, layout):
    """``base`` [N, C, H, 2W] as the input of the layout: its first W columns (NCHW), the same
    in channels-last, or every other column (neither layout)."""
    if layout == "strided":
        return base[..., ::2]
    x = base[..., : base.shape[-1] // 2]
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _tensors(n, seed):
    """A [n, 5, 7, 18] float64 base map (see ``_layout``), a 5 -> 6 weight and its bias."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 5, 7, 18, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 5, 1, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    return base, weight, bias


def _inputs(n, layout, seed=0):
    base, weight, bias = _tensors(n, seed)
    return _layout(base, layout), weight, bias


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_conv2d_values_and_gradients(n, layout, with_bias):
    base, weight, bias = _tensors(n, seed=1)
    bias = bias if with_bias else None
    grad = torch.randn(n, 6, 7, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (base, weight, bias) if t is not None]
    ref_leaves = [t.clone().requires_grad_() for t in (base, weight, bias) if t is not None]

    x = _layout(leaves[0], layout)
    assert x.is_contiguous() == (layout == "nchw")
    out = pointwise_conv2d(x, leaves[1], leaves[2] if with_bias else None)
    # the reference: the convolution's sum written out, channel by channel
    ref_x = ref_leaves[0][..., ::2] if layout == "strided" else ref_leaves[0][..., :9]
    ref = sum(ref_x[:, c, None] * ref_leaves[1][None, :, c, 0, 0, None, None] for c in range(5))
    if with_bias:
        ref = ref + ref_leaves[2][None, :, None, None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    conv = F.conv2d(x.detach(), weight, bias)
    torch.testing.assert_close(out, conv, rtol=1e-12, atol=1e-12)
    out.backward(grad)
    ref.backward(grad)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_output_layout_follows_the_input(layout):
    x, weight, bias = _inputs(2, layout)
    out = pointwise_conv2d(x, weight, bias)
    if layout == "nchw":
        assert out.is_contiguous()
    else:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_float32_matches_float64():
    x, weight, bias = _inputs(2, "nchw")
    out = pointwise_conv2d(x.float(), weight.float(), bias.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), F.conv2d(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_bf16_autocast_runs_the_product_in_bfloat16(n):
    x, weight, bias = (t.float() for t in _inputs(n, "nchw"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pointwise_conv2d(x, weight, bias)
    assert out.dtype == torch.bfloat16
    ref = F.conv2d(x.double(), weight.double(), bias.double())
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_module_is_a_drop_in_for_detectron2_conv2d():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 6)
    module = PointwiseConv2d(5, 6, bias=False, norm=norm, activation=F.relu)
    reference = Conv2d(
        5, 6, kernel_size=1, bias=False, norm=torch.nn.GroupNorm(2, 6), activation=F.relu
    )
    assert module.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-6)
    assert module.weight.shape == (6, 5, 1, 1) and module.bias is None
