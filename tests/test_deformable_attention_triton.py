"""Triton multi-scale deformable attention against a brute-force float64 bilinear reference.

Triton decides whether its kernels are compiled or interpreted when they are decorated (when
``ms_deform_attn_triton`` is imported), from ``TRITON_INTERPRET``. The kernels therefore run in a
subprocess started with ``TRITON_INTERPRET=1`` (this file run as a script), which runs them on CPU
tensors and saves the results; this process computes the reference and compares. Inputs: odd
level sizes, several levels and points, head dims that are not powers of two, query counts that
are not multiples of the query block, sampling points in the border bands, outside and far
outside (beyond the int32 range in pixels) the maps.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# name -> (level shapes (H, W), N, Lq, M, D, P, dtype)
CASES = {
    # 3 levels, 3 points, 2 heads, head dim 6; fp32 as the model runs it
    "odd": ([(7, 5), (4, 3), (2, 2)], 2, 5, 2, 6, 3, torch.float32),
    # head dim 32, 70 queries: several query blocks, the last one partial; a 1x1 level
    "blocks": ([(3, 9), (1, 1)], 1, 70, 1, 32, 1, torch.float32),
    # bf16 inputs: fp32 compute, results in bf16
    "bf16": ([(5, 6), (3, 2)], 1, 4, 3, 5, 2, torch.bfloat16),
}
GRADS = ("value", "locations", "weights")


# ------------------------------------------------------------------------------------ reference
def bilinear_reference(value, shapes, locations, weights, padding="zeros"):
    """Explicit gather of the four corners (x0, y0) .. (x0 + 1, y0 + 1) of
    ``x = loc_x * W - 0.5`` (pixel centres at integers) in float64; corners outside the map read
    zeros (``padding="zeros"``) or, as a deliberately wrong variant, the nearest border pixel
    (``padding="border"``). Differentiable by autograd (the corner indices are constants)."""
    n, _, m, d = value.shape
    lq = locations.shape[1]
    images = torch.arange(n).view(n, 1, 1, 1)
    heads = torch.arange(m).view(1, 1, m, 1)
    out = value.new_zeros(n, lq, m, d)
    start = 0
    for level, (h, w) in enumerate(shapes):
        level_value = value[:, start : start + h * w]  # [N, H*W, M, D]
        x = locations[:, :, :, level, :, 0] * w - 0.5  # [N, Lq, M, P]
        y = locations[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            cx, cy = x0 + dx, y0 + dy
            bilinear = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
            if padding == "zeros":
                bilinear = bilinear * inside
            rows = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()
            corner = level_value[images, rows, heads]  # [N, Lq, M, P, D]
            contribution = (weights[:, :, :, level] * bilinear).unsqueeze(-1) * corner
            out = out + contribution.sum(3)
        start += h * w
    return out.reshape(n, lq, m * d)


def grid_sample_reference(value, shapes, locations, weights):
    """The official formulation (one ``grid_sample`` per level), to validate the reference."""
    n, _, m, d = value.shape
    _, lq, _, _, n_points, _ = locations.shape
    out = value.new_zeros(n * m, d, lq)
    start = 0
    for level, (h, w) in enumerate(shapes):
        maps = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = 2 * locations[:, :, :, level].transpose(1, 2).reshape(n * m, lq, n_points, 2) - 1
        sampled = F.grid_sample(maps, grid, padding_mode="zeros", align_corners=False)
        level_weights = weights[:, :, :, level].transpose(1, 2).reshape(n * m, 1, lq, n_points)
        out = out + (sampled * level_weights).sum(-1)
        start += h * w
    return out.view(n, m * d, lq).transpose(1, 2)


def sampling_locations(n, lq, m, shapes, n_points, generator):
    """Normalised locations whose pixel coordinates cover the interior, the 1-pixel border bands
    (some corners outside), points outside, and far outside (1e10 pixels); kept off integer pixel
    coordinates, where the gradient w.r.t. the location jumps."""
    n_levels = len(shapes)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(n_levels, 1, 2)
    shape = (n, lq, m, n_levels, n_points)
    u = torch.rand(*shape, 2, generator=generator, dtype=torch.float64)
    kind = torch.randint(0, 5, (*shape, 1), generator=generator)
    pixel = torch.where(kind == 0, u * size - 0.5, u)  # interior (-0.5 .. size - 0.5)
    pixel = torch.where(kind == 1, -1 + u, pixel)  # border band before the map (-1 .. 0)
    pixel = torch.where(kind == 2, size - 1 + u, pixel)  # border band after (size - 1 .. size)
    pixel = torch.where(kind == 3, torch.where(u < 0.5, -3 - 4 * u, size + 1 + 4 * u), pixel)
    pixel = torch.where(kind == 4, torch.where(u < 0.5, -1e10, 1e10 * (1 + u)), pixel)
    frac = pixel - pixel.floor()
    pixel = torch.where((frac < 0.05) | (frac > 0.95), pixel + 0.1, pixel)
    return (pixel + 0.5) / size


def case_inputs(name):
    """(value, locations, weights, grad_out) of a case, already rounded to the case's dtype."""
    shapes, n, lq, m, d, n_points, dtype = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    locations = sampling_locations(n, lq, m, shapes, n_points, g)
    weights = torch.rand(n, lq, m, len(shapes), n_points, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, lq, m * d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (value, locations, weights, grad_out)]


def reference(name, padding="zeros", shift=0.0):
    """Float64 reference output and gradients of a case (from its rounded inputs)."""
    shapes = CASES[name][0]
    value, locations, weights, grad_out = [t.double() for t in case_inputs(name)]
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    out = bilinear_reference(value, shapes, locations + shift, weights, padding)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return {"out": out.detach(), **{f"grad_{k}": g for k, g in zip(GRADS, grads)}}


# ------------------------------------------------------------------------- interpreted kernels
def run_interpreted_cases(output_path):
    """Runs in the ``TRITON_INTERPRET=1`` subprocess: the op on every case, saved to a file."""
    from mask2former.modeling.pixel_decoder.deformable_attention_triton import (
        ms_deform_attn_triton,
        triton_available,
    )

    results = {"available_cpu": triton_available("cpu"), "available_cuda": triton_available("cuda")}
    for name, (shapes, *_) in CASES.items():
        value, locations, weights, grad_out = case_inputs(name)
        inputs = [t.requires_grad_() for t in (value, locations, weights)]
        out = ms_deform_attn_triton(value, shapes, locations, weights)
        grads = torch.autograd.grad(out, inputs, grad_out)
        results[name] = {"out": out, **{f"grad_{k}": g for k, g in zip(GRADS, grads)}}
    # one gradient at a time (the kernel skips the other gradients): value only, sampling only
    value, locations, weights, grad_out = case_inputs("odd")
    shapes = CASES["odd"][0]
    out = ms_deform_attn_triton(value.requires_grad_(), shapes, locations, weights)
    (results["odd_value_only"],) = torch.autograd.grad(out, [value], grad_out)
    value, locations, weights, grad_out = case_inputs("odd")
    inputs = [locations.requires_grad_(), weights.requires_grad_()]
    out = ms_deform_attn_triton(value, torch.tensor(shapes), *inputs)
    results["odd_sampling_only"] = list(torch.autograd.grad(out, inputs, grad_out))
    # bad input: positions and shapes disagree
    try:
        ms_deform_attn_triton(value[:, 1:], shapes, locations, weights)
        results["bad_positions"] = ""
    except ValueError as error:
        results["bad_positions"] = str(error)
    torch.save(results, output_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    output = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(output)]
    proc = subprocess.run(
        cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(output, weights_only=True)


# ------------------------------------------------------------------------------------------ tests
def test_reference_matches_grid_sample():
    """The brute-force reference is the official grid_sample formulation (values, gradients)."""
    for name, (shapes, *_) in CASES.items():
        value, locations, weights, _ = [t.double().requires_grad_() for t in case_inputs(name)]
        ours = bilinear_reference(value, shapes, locations, weights)
        official = grid_sample_reference(value, shapes, locations, weights)
        torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(ours.sum(), (value, locations, weights))
        official_grads = torch.autograd.grad(official.sum(), (value, locations, weights))
        for ours_grad, official_grad in zip(grads, official_grads):
            torch.testing.assert_close(ours_grad, official_grad, rtol=1e-8, atol=1e-8)


# fp32 compute of O(1) numbers: a wrong corner, a missing zero padding or a half-pixel shift
# changes results by more than 1e-2 (checked below), far above these tolerances
TOLERANCES = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (1.6e-2, 3e-2)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_matches_reference(interpreted, name):
    dtype = CASES[name][-1]
    rtol, atol = TOLERANCES[dtype]
    expected = reference(name)
    for key, want in expected.items():
        got = interpreted[name][key]
        assert got.dtype == dtype, (key, got.dtype)
        # location gradients scale with the map size (x = loc * W - 0.5)
        scale = max(max(shape) for shape in CASES[name][0]) if key == "grad_locations" else 1
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, msg=key)


@pytest.mark.parametrize("name", ["odd", "blocks"])
def test_tolerance_catches_wrong_sampling(interpreted, name):
    """The comparison above would fail for border instead of zero padding, or for a half-pixel
    shift of the sampling grid (``align_corners``-style error)."""
    got = interpreted[name]["out"].double()
    shapes = CASES[name][0]
    half_pixel = torch.tensor([[0.5 / w, 0.5 / h] for h, w in shapes], dtype=torch.float64)
    for wrong in (reference(name, padding="border"), reference(name, shift=half_pixel[:, None])):
        assert (got - wrong["out"]).abs().max() > 1e-2


def test_single_gradients(interpreted):
    """Only the value, or only the sampling inputs, requiring a gradient: same gradients."""
    expected = reference("odd")
    torch.testing.assert_close(
        interpreted["odd_value_only"].double(), expected["grad_value"], rtol=1e-5, atol=2e-5
    )
    grad_locations, grad_weights = interpreted["odd_sampling_only"]
    torch.testing.assert_close(
        grad_locations.double(), expected["grad_locations"], rtol=1e-5, atol=2e-4
    )
    torch.testing.assert_close(
        grad_weights.double(), expected["grad_weights"], rtol=1e-5, atol=2e-5
    )


def test_availability_and_errors(interpreted):
    assert interpreted["available_cpu"] and not interpreted["available_cuda"]
    assert "spatial shapes" in interpreted["bad_positions"]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="checks the compiled (not interpreted) mode",
)
def test_cpu_tensors_refused_without_interpreter():
    from mask2former.modeling.pixel_decoder.deformable_attention_triton import (
        ms_deform_attn_triton,
        triton_available,
    )

    assert not triton_available("cpu")
    value, locations, weights, _ = case_inputs("odd")
    with pytest.raises(RuntimeError, match="triton_available"):
        ms_deform_attn_triton(value, CASES["odd"][0], locations, weights)


def compile_for_sm90(kernel, pointer_types, constexprs):
    """Ahead-of-time compilation of a kernel to a CUDA binary for sm_90 (no GPU needed: Triton
    ships ptxas), pointers 16-byte aligned as Triton specialises them at launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="compiles the kernels (not interpreted)",
)
def test_kernels_compile_for_cuda():
    """The compiled path (which the interpreter does not exercise) builds for an sm_90 GPU, the
    Mask2Former configuration (8 heads of 32, 3 levels, 4 points): bf16 value maps with fp32
    locations forward, fp32 backward with fp32 atomic adds for the value gradient."""
    pytest.importorskip("triton")
    from mask2former.modeling.pixel_decoder import deformable_attention_triton as op

    sizes = dict(NUM_HEADS=8, HEAD_DIM=32, NUM_LEVELS=3, NUM_POINTS=4, BLOCK_Q=32, BLOCK_D=32)
    forward = op._ms_deform_attn_forward_kernel
    pointers = {"value_ptr": "*bf16", "levels_ptr": "*i32", "loc_ptr": "*fp32"}
    pointers.update(weight_ptr="*fp32", out_ptr="*bf16")
    assert compile_for_sm90(forward, pointers, sizes).asm["cubin"]
    backward = op._ms_deform_attn_backward_kernel
    pointers = {name: "*fp32" for name in backward.arg_names if name.endswith("_ptr")}
    pointers["levels_ptr"] = "*i32"
    flags = dict(GRAD_VALUE=True, GRAD_SAMPLING=True)
    compiled = compile_for_sm90(backward, pointers, {**sizes, **flags})
    assert compiled.asm["cubin"]
    assert re.search(r"atom\.global\.\S*add\S*\.f32", compiled.asm["ptx"])


if __name__ == "__main__":
    run_interpreted_cases(sys.argv[1])
