"""Swin's window attention as compiled CPU kernels (backbone/window_attention_cpu.py): values and
gradients (q, k, v, padding row, relative position bias) against a brute-force float64
computation written from the definition, odd window / map / head sizes, shift masks, float32,
bfloat16, every instruction-set copy of the kernels (also the matcher's), thread-count
independence, the floating-point mode left as it was, input checks, the custom operators'
registration, and the Swin block's use of it against its window-partition path."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mask2former.modeling.backbone.swin import SwinTransformerBlock, WindowLayout
from mask2former.modeling.backbone.window_attention_cpu import _forward_op, window_attention_cpu


def reference_attention(qkv, pad, index, bias, mask, scale):
    """Per image, window and head: the window's q, k, v gathered slot by slot (padding slots
    take ``pad``), softmax((q * scale) k^T + bias + mask) v, each real token's output taken
    from its slot. Plain loops over windows and heads, float64."""
    b, length, _, heads, dim = qkv.shape
    n = bias.shape[-1]
    windows = index.numel() // n
    out = qkv.new_zeros(b, length, heads, dim)
    rows = []
    for image in range(b):
        for w in range(windows):
            slots = index[w * n : (w + 1) * n].tolist()
            for h in range(heads):
                vectors = [
                    torch.stack(
                        [qkv[image, t, part, h] if t < length else pad[part, h] for t in slots]
                    )
                    for part in range(3)
                ]
                q, k, v = vectors
                logits = (q * scale) @ k.t() + bias[h]
                if mask is not None:
                    logits = logits + mask[w]
                result = logits.softmax(-1) @ v
                for i, t in enumerate(slots):
                    if t < length:
                        rows.append((image, t, h, result[i]))
    for image, t, h, row in rows:
        out[image, t, h] = out[image, t, h] + row
    return out.flatten(2)


def random_problem(h, w, window, shift, heads, dim, batch=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layout = WindowLayout(h, w, window, shift, torch.device("cpu"))
    n = window * window

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype)

    qkv = randn(batch, h * w, 3, heads, dim)
    pad = randn(3, heads, dim, std=0.5)
    bias = randn(heads, n, n)
    mask = None if layout.attn_mask is None else layout.attn_mask.to(dtype)
    return qkv, pad, layout.partition_index, bias, mask, dim**-0.5


# (h, w, window, shift, heads, dim): padded and exact maps, shifts, head dims that are not a
# multiple of the vector width, a map smaller than one window
SHAPES = [
    (5, 7, 3, 0, 2, 4),
    (5, 7, 3, 1, 2, 4),
    (7, 8, 4, 2, 3, 12),
    (6, 6, 3, 1, 1, 20),
    (2, 3, 3, 1, 2, 8),
    (9, 9, 7, 3, 2, 32),
]


@pytest.mark.parametrize("h,w,window,shift,heads,dim", SHAPES)
def test_values_and_gradients_match_bruteforce(h, w, window, shift, heads, dim):
    qkv, pad, index, bias, mask, scale = random_problem(h, w, window, shift, heads, dim)
    inputs = [t.clone().requires_grad_() for t in (qkv, pad, bias)]
    expected = reference_attention(inputs[0], inputs[1], index, inputs[2], mask, scale)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    # a map of whole windows has no padding slot: no gradient for the padding row
    expected_grads = [
        torch.zeros_like(t) if g is None else g for t, g in zip(inputs, expected_grads)
    ]

    leaves = [t.clone().requires_grad_() for t in (qkv, pad, bias)]
    out = window_attention_cpu(leaves[0], leaves[1], index, leaves[2], mask, scale)
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("qkv", "pad", "bias"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=name)
    if (h % window or w % window) and shift == 0:
        # the padding slots really are keys and values: their row gets a gradient
        assert expected_grads[1][1:].abs().sum() > 0


def test_float32_close_to_float64():
    shape = (9, 9, 7, 3, 3, 32)
    qkv, pad, index, bias, mask, scale = random_problem(*shape)
    grad = torch.randn(2, 81, 96, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (qkv, pad, bias)]
        m = None if mask is None else mask.to(dtype)
        out = window_attention_cpu(leaves[0], leaves[1], index, leaves[2], m, scale)
        grads = torch.autograd.grad(out, leaves, grad.to(dtype))
        results[dtype] = [out, *grads]
    for got, want in zip(results[torch.float32], results[torch.float64]):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_results_do_not_depend_on_thread_count():
    qkv, pad, index, bias, mask, scale = random_problem(13, 11, 4, 2, 3, 16, dtype=torch.float32)
    grad = torch.randn(2, 143, 48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (qkv, pad, bias)]
            out = window_attention_cpu(leaves[0], leaves[1], index, leaves[2], mask, scale)
            results.append([out, *torch.autograd.grad(out, leaves, grad)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_far_masked_keys_get_no_weight_and_the_float_mode_is_restored():
    # a key 100 below the other gets a weight of ~e^-100 (a denormal float, flushed inside the
    # kernel): nothing of its value reaches the output
    qkv = torch.zeros(1, 2, 3, 1, 1)
    qkv[0, :, 2, 0, 0] = torch.tensor([1.0, 5.0])  # values
    bias = torch.tensor([[[0.0, -100.0], [0.0, 0.0]]])
    index = torch.tensor([0, 1])
    out = window_attention_cpu(qkv, torch.zeros(3, 1, 1), index, bias, None, 1.0)
    assert out[0, 0, 0] == 1.0  # exactly the first value: the second's weight is 0
    torch.testing.assert_close(out[0, 1, 0], torch.tensor(3.0))
    # the kernel (one task: run in this thread) restores the thread's floating-point mode, so
    # arithmetic here still keeps denormals
    denormal = torch.tensor([1e-40])
    assert (denormal * 1.0).item() != 0.0


@pytest.mark.parametrize("h,w,window,shift,heads,dim", [(9, 9, 7, 3, 3, 32), (5, 7, 3, 1, 2, 12)])
def test_bfloat16_forward_rounds_the_float32_result(h, w, window, shift, heads, dim):
    qkv, pad, index, bias, mask, scale = random_problem(h, w, window, shift, heads, dim)
    # the exact result of the bfloat16 inputs, then rounded once to bfloat16
    qkv16, pad16, bias16 = (t.bfloat16() for t in (qkv, pad, bias))
    mask16 = None if mask is None else mask.bfloat16()
    exact = reference_attention(
        qkv16.double(),
        pad16.double(),
        index,
        bias16.double(),
        None if mask16 is None else mask16.double(),
        scale,
    )
    out = window_attention_cpu(qkv16, pad16, index, bias16, mask16, scale)
    assert out.dtype == torch.bfloat16
    # float32 accumulation, one rounding: within a bfloat16 step of the exact value
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((out.double() - exact).abs() <= step * 0.51 + 1e-6).all()


def test_bfloat16_has_no_backward():
    qkv, pad, index, bias, mask, scale = random_problem(5, 7, 3, 1, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no backward"):
        window_attention_cpu(qkv.requires_grad_(), pad, index, bias, mask, scale)


def test_no_softmax_is_kept_without_gradients():
    qkv, pad, index, bias, mask, scale = random_problem(5, 7, 3, 1, 2, 4, dtype=torch.float32)
    out, probs = _forward_op(qkv, pad, index, bias, mask, scale, False)
    assert probs.numel() == 0
    with torch.no_grad():
        again = window_attention_cpu(qkv.requires_grad_(), pad, index, bias, mask, scale)
    torch.testing.assert_close(again, out.flatten(2))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "qkv": a["qkv"].half()}, "float32, float64 or bfloat16"),
        (lambda a: {**a, "pad": a["pad"].float()}, "pad is torch.float32"),
        (lambda a: {**a, "pad": a["pad"][:2]}, "pad"),
        (lambda a: {**a, "bias": a["bias"][:, :, :5]}, "bias must be"),
        (lambda a: {**a, "index": a["index"][:-1]}, "not whole windows"),
        (lambda a: {**a, "index": a["index"].int()}, "int64"),
        (lambda a: {**a, "mask": a["mask"][:-1]}, "mask"),
        (lambda a: {**a, "qkv": a["qkv"][:, :, :2]}, r"\[B, L, 3, H, D\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    qkv, pad, index, bias, mask, scale = random_problem(5, 7, 3, 1, 2, 4)
    args = change(dict(qkv=qkv, pad=pad, index=index, bias=bias, mask=mask))
    with pytest.raises((TypeError, ValueError), match=message):
        window_attention_cpu(**args, scale=scale)


def test_custom_operator_registration():
    qkv, pad, index, bias, mask, scale = random_problem(5, 7, 3, 1, 2, 4)
    qkv.requires_grad_()
    pad.requires_grad_()
    bias.requires_grad_()
    torch.library.opcheck(_forward_op, (qkv, pad, index, bias, mask, scale, True))


@pytest.mark.parametrize("h,w,window,shift", [(5, 7, 3, 1), (8, 8, 4, 0), (2, 3, 3, 1)])
def test_swin_block_kernel_path_equals_partition_path(h, w, window, shift, monkeypatch):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=12, num_heads=3, window_size=window, shift_size=shift)
    block = block.double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        block.attn.qkv.bias.normal_(0, 1.0)
    layout = WindowLayout(h, w, window, shift, torch.device("cpu"))
    x = torch.randn(2, h * w, 12, dtype=torch.float64)
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(type(block.attn), "uses_cpu_kernel", lambda self, x, k=kernel: k)
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        out = block(leaf, layout)
        out.square().sum().backward()
        grads = [leaf.grad] + [p.grad for p in block.attn.parameters()]
        results[kernel] = [out] + grads
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_partition_impl_never_uses_the_kernel_and_bad_impls_are_refused():
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=3, attention_impl="partition")
    assert not block.attn.uses_cpu_kernel(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match="window attention impl"):
        SwinTransformerBlock(dim=8, num_heads=2, window_size=3, attention_impl="cuda")


def test_swin_block_uses_the_kernel_only_where_it_applies():
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=3, shift_size=1)
    x = torch.randn(1, 12, 8)
    assert block.attn.uses_cpu_kernel(x)
    assert block.attn.uses_cpu_kernel(x.double())
    assert not block.attn.uses_cpu_kernel(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not block.attn.uses_cpu_kernel(x)  # training: the bfloat16 kernel has no backward
        with torch.no_grad():
            assert block.attn.uses_cpu_kernel(x)  # bf16 inference
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        assert not block.attn.uses_cpu_kernel(x)
    dropout = SwinTransformerBlock(dim=8, num_heads=2, window_size=3, attn_drop=0.1)
    assert not dropout.attn.uses_cpu_kernel(x)  # training mode: attention dropout
    assert dropout.eval().attn.uses_cpu_kernel(x)
    assert math.isclose(block.attn.scale, 4**-0.5)


def test_swin_block_bf16_inference_kernel_path_close_to_partition_path(monkeypatch):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=32, num_heads=2, window_size=4, shift_size=2).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
    layout = WindowLayout(9, 10, 4, 2, torch.device("cpu"))
    x = torch.randn(2, 90, 32)
    results = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kernel in (True, False):
            monkeypatch.setattr(type(block.attn), "uses_cpu_kernel", lambda self, x, k=kernel: k)
            results[kernel] = block.attn.forward_map(x, layout).float()
    with torch.no_grad():
        exact = block.attn.forward_map(x, layout)  # float32
    # both bfloat16 paths are within bfloat16 rounding of the float32 result, and of each other
    scale = exact.abs().max()
    for result in results.values():
        assert (result - exact).abs().max() < 0.02 * scale
    assert (results[True] - results[False]).abs().max() < 0.02 * scale


# Runs in a subprocess whose kernels are capped to one instruction-set copy: the window
# attention (float64 values and gradients against the brute force, float32 and bfloat16 against
# float64) and the matcher's mask costs against its PyTorch path.
_ISA_CHECK = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_window_attention_cpu import random_problem, reference_attention
    from mask2former.modeling.backbone.window_attention_cpu import window_attention_cpu
    from mask2former.modeling.matcher import mask_costs
    for shape in [(5, 7, 3, 1, 2, 4), (9, 9, 7, 3, 3, 32), (6, 6, 3, 0, 1, 20)]:
        qkv, pad, index, bias, mask, scale = random_problem(*shape)
        leaves = [t.clone().requires_grad_() for t in (qkv, pad, bias)]
        expected = reference_attention(leaves[0], leaves[1], index, leaves[2], mask, scale)
        grad = torch.randn_like(expected)
        want = torch.autograd.grad(expected, leaves, grad, allow_unused=True)
        for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
            inputs = [t.to(dtype, copy=True).requires_grad_() for t in (qkv, pad, bias)]
            m = None if mask is None else mask.to(dtype)
            out = window_attention_cpu(inputs[0], inputs[1], index, inputs[2], m, scale)
            got = torch.autograd.grad(out, inputs, grad.to(dtype))
            torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
            for g, w in zip(got, want):
                w = torch.zeros_like(g.double()) if w is None else w
                torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
        b16 = [t.bfloat16() for t in (qkv, pad, bias)]
        m16 = None if mask is None else mask.bfloat16()
        out = window_attention_cpu(b16[0], b16[1], index, b16[2], m16, scale).double()
        torch.testing.assert_close(out, expected, rtol=0.03, atol=0.03)
    torch.manual_seed(0)
    pred, coords = torch.randn(37, 11, 13), torch.rand(1000, 2)
    targets = (torch.rand(3, 1000) > 0.5).float()
    for got, want in zip(mask_costs(pred, coords, targets, None, "cpu"),
                         mask_costs(pred, coords, targets, None, "pytorch")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from mask2former.kernels import kernel_isa_level
    print("level", kernel_isa_level(), "ok")
    """
)


@pytest.mark.parametrize("isa", ["v3", "base"])
def test_every_instruction_set_copy_of_the_kernels_is_right(isa):
    """The kernels carry a copy per instruction-set level (vector widths 64 / 32 / 16 bytes);
    the CPU running the tests picks one, MASK2FORMER_KERNEL_ISA caps it to test the others."""
    env = {**os.environ, "MASK2FORMER_KERNEL_ISA": isa}
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK, tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    level = int(proc.stdout.split()[-2])
    assert level == 0 if isa == "base" else level in (0, 3)  # the cap took effect
