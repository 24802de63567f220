"""Multi-scale deformable attention: the implementations against a brute-force bilinear
reference (values and gradients, float64), fast and cpu == pytorch in fp32, and the module."""

import math

import numpy as np
import pytest
import torch

from mask2former.modeling.pixel_decoder.deformable_attention import (
    MSDeformAttn,
    ms_deform_attn_cpu,
    ms_deform_attn_fast,
    ms_deform_attn_pytorch,
)

IMPLS = {"pytorch": ms_deform_attn_pytorch, "fast": ms_deform_attn_fast, "cpu": ms_deform_attn_cpu}
# odd sizes, a 1x1 level and a tall thin one
SHAPES = [(5, 7), (3, 4), (1, 1), (6, 2)]


def bilinear_reference(value, shapes, locations, weights):
    """Explicit loops: corners (x0, y0) .. (x0+1, y0+1) of x = loc_x * W - 0.5 (pixel centres
    at integers), zero outside the map. Built from scalar tensor ops so autograd gives the
    reference gradients (floor is piecewise constant)."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = []
    for b in range(n):
        for q in range(lq):
            heads = []
            for head in range(m):
                acc = value.new_zeros(d)
                for level, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = locations[b, q, head, level, p, 0] * w - 0.5
                        y = locations[b, q, head, level, p, 1] * h - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= cx < w and 0 <= cy < h:
                                bilinear = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
                                row = value[b, starts[level] + cy * w + cx, head]
                                acc = acc + weights[b, q, head, level, p] * bilinear * row
                heads.append(acc)
            out.append(torch.cat(heads))
    return torch.stack(out).view(n, lq, m * d)


def sampling_locations(n, lq, m, shapes, n_points, generator, dtype=torch.float64):
    """Locations in pixel units covering the interior, the 1-pixel border bands (where one
    corner is outside), points fully outside, and far outside; kept off integer coordinates
    (where the bilinear gradient w.r.t. the location jumps)."""
    n_levels = len(shapes)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype).view(n_levels, 1, 2)
    u = torch.rand(n, lq, m, n_levels, n_points, 2, generator=generator, dtype=dtype)
    kind = torch.randint(0, 4, (n, lq, m, n_levels, n_points, 1), generator=generator)
    pixel = torch.where(kind == 0, u * size - 0.5, u)  # interior (-0.5 .. size - 0.5)
    pixel = torch.where(kind == 1, -1 + u, pixel)  # border band before the map (-1 .. 0)
    pixel = torch.where(kind == 2, size - 1 + u, pixel)  # border band after (size - 1 .. size)
    outside = torch.where(u < 0.5, -3 - 4 * u, size + 1 + 4 * u)
    pixel = torch.where(kind == 3, outside, pixel)
    frac = pixel - pixel.floor()
    pixel = torch.where((frac < 0.02) | (frac > 0.98), pixel + 0.05, pixel)
    return (pixel + 0.5) / size


def random_inputs(shapes, n=2, lq=5, m=2, d=3, n_points=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    locations = sampling_locations(n, lq, m, shapes, n_points, g, dtype)
    weights = torch.rand(n, lq, m, len(shapes), n_points, generator=g, dtype=dtype)
    return value, locations, weights


def test_sampling_locations_cover_all_cases():
    value, locations, _ = random_inputs(SHAPES, n=2, lq=20)
    size = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64).view(len(SHAPES), 1, 2)
    pixel = locations * size - 0.5
    assert ((pixel > 0) & (pixel < size - 1)).any()
    assert ((pixel > -1) & (pixel < 0)).any()
    assert ((pixel > size - 1) & (pixel < size)).any()
    assert (pixel < -1).any() and (pixel > size).any()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_forward_matches_bruteforce(impl):
    value, locations, weights = random_inputs(SHAPES)
    expected = bilinear_reference(value, SHAPES, locations, weights)
    got = IMPLS[impl](value, torch.tensor(SHAPES), locations, weights)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_forward_exact_pixel_centres_and_edges(impl):
    """At pixel centres the sample is the pixel; at the outer edges (x = -0.5, W - 0.5 in
    pixels) half of the edge pixel; beyond x = -1 or x = W nothing."""
    shapes = [(3, 4)]
    value = torch.randn(1, 12, 1, 2, dtype=torch.float64)
    pixel_xy = [(0, 0), (3, 2), (1, 1), (-0.5, 1), (3.5, 1), (-1, 1), (4, 1), (1, -2)]
    locations = [[(x + 0.5) / 4, (y + 0.5) / 3] for x, y in pixel_xy]
    locations = torch.tensor(locations, dtype=torch.float64)
    locations = locations.view(1, len(pixel_xy), 1, 1, 1, 2)
    weights = torch.ones(1, len(pixel_xy), 1, 1, 1, dtype=torch.float64)
    out = IMPLS[impl](value, shapes, locations, weights).view(len(pixel_xy), 2)
    v = value.view(3, 4, 2)
    zero = torch.zeros(2, dtype=torch.float64)
    expected = torch.stack(
        [v[0, 0], v[2, 3], v[1, 1], 0.5 * v[1, 0], 0.5 * v[1, 3], zero, zero, zero]
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_gradients_match_bruteforce(impl):
    value, locations, weights = random_inputs(SHAPES, seed=1)
    n, _, m, d = value.shape
    grad_out = torch.randn(n, locations.shape[1], m * d, dtype=torch.float64)
    grads = []
    for fn in (bilinear_reference, IMPLS[impl]):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        fn(inputs[0], SHAPES, inputs[1], inputs[2]).backward(grad_out)
        grads.append([t.grad for t in inputs])
    for name, expected, got in zip(("value", "locations", "weights"), *grads):
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_gradcheck(impl):
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(shapes, n=1, lq=3, m=2, d=2, n_points=2, seed=2)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: IMPLS[impl](v, shapes, loc, w), inputs, eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_equals_pytorch_fp32(impl):
    shapes = [(13, 17), (7, 9), (4, 5)]
    value, locations, weights = random_inputs(
        shapes, n=2, lq=60, m=4, d=8, n_points=4, seed=3, dtype=torch.float32
    )
    grad_out = torch.randn(2, 60, 32)
    results = []
    for fn in (ms_deform_attn_pytorch, IMPLS[impl]):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(grad_out)
        results.append([out] + [t.grad for t in inputs])
    for name, a, b in zip(("output", "value", "locations", "weights"), *results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_shape_mismatch_raises(impl):
    value, locations, weights = random_inputs(SHAPES)
    with pytest.raises(ValueError, match="positions"):
        IMPLS[impl](value[:, :-1], SHAPES, locations, weights)


# ------------------------------------------------------------------------------------ module
def test_module_official_names_and_init():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    names = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert names == {
        "sampling_offsets.weight": (4 * 3 * 2 * 2, 32),
        "sampling_offsets.bias": (4 * 3 * 2 * 2,),
        "attention_weights.weight": (4 * 3 * 2, 32),
        "attention_weights.bias": (4 * 3 * 2,),
        "value_proj.weight": (32, 32),
        "value_proj.bias": (32,),
        "output_proj.weight": (32, 32),
        "output_proj.bias": (32,),
    }
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()
    # head h points towards angle 2*pi*h/4 (max-norm 1), point i at distance i + 1, every level
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    for h in range(4):
        direction = torch.tensor([math.cos(2 * math.pi * h / 4), math.sin(2 * math.pi * h / 4)])
        direction = direction / direction.abs().max()
        for level in range(3):
            for i in range(2):
                torch.testing.assert_close(bias[h, level, i], direction * (i + 1))


def _module_inputs(shapes, n=2, d_model=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    query = torch.randn(n, 11, d_model, generator=g)
    value = torch.randn(n, s, d_model, generator=g)
    reference = torch.rand(n, 11, len(shapes), 2, generator=g)
    return query, reference, value


def _perturbed_module(impl, shapes, seed=0):
    torch.manual_seed(seed)
    attn = MSDeformAttn(d_model=32, n_levels=len(shapes), n_heads=4, n_points=3, impl=impl)
    with torch.no_grad():  # leave the initial ring: offsets / weights depending on the query
        attn.sampling_offsets.weight.normal_(0, 0.2)
        attn.attention_weights.weight.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize("impl", ["fast", "cpu"])
@pytest.mark.parametrize("box_reference", [False, True])
def test_module_equals_pytorch(impl, box_reference):
    shapes = [(7, 9), (4, 5), (2, 3)]
    query, reference, value = _module_inputs(shapes)
    if box_reference:
        reference = torch.cat([reference, 0.1 + 0.3 * torch.rand_like(reference)], -1)
    start = torch.tensor([0, 63, 83])
    padding = torch.zeros(2, value.shape[1], dtype=torch.bool)
    padding[1, 50:63] = True
    outs = []
    for name in ("pytorch", impl):
        attn = _perturbed_module(name, shapes)
        q = query.clone().requires_grad_()
        out = attn(q, reference, value, torch.tensor(shapes), start, padding)
        out.square().sum().backward()
        outs.append((out, q.grad, attn.sampling_offsets.weight.grad, attn.value_proj.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["pytorch", "fast", "cpu"])
def test_module_padding_mask_hides_values(impl):
    shapes = [(7, 9), (4, 5)]
    query, reference, value = _module_inputs(shapes)
    padding = torch.zeros(2, value.shape[1], dtype=torch.bool)
    padding[:, 5:20] = True
    padding[0, 70:] = True
    attn = _perturbed_module(impl, shapes)
    out = attn(query, reference, value, shapes, None, padding)
    changed = value + 100 * padding[..., None]
    torch.testing.assert_close(attn(query, reference, changed, shapes, None, padding), out)
    assert not torch.allclose(attn(query, reference, changed, shapes, None, None), out)


@pytest.mark.parametrize("impl", ["fast", "cpu"])
def test_module_autocast_runs_op_in_fp32(impl):
    shapes = [(7, 9), (4, 5)]
    query, reference, value = _module_inputs(shapes)
    seen = []
    attn = _perturbed_module(impl, shapes)
    attn.value_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    expected = attn(query, reference, value, shapes)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attn(query, reference, value, shapes)
    assert seen[-1] == torch.bfloat16  # projections ran under autocast ...
    assert torch.isfinite(out).all()  # ... and the sampling in fp32: error at bf16 rounding level
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_module_rejects_bad_impl_and_shapes():
    with pytest.raises(ValueError):
        MSDeformAttn(d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        MSDeformAttn(impl="cuda")
    shapes = [(7, 9), (4, 5)]
    query, reference, value = _module_inputs(shapes)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with pytest.raises(ValueError):
        attn(query, reference, value, [(7, 9), (4, 4)])


def test_auto_impl_uses_the_compiled_kernels_on_cpu(monkeypatch):
    shapes = [(7, 9), (4, 5)]
    query, reference, value = _module_inputs(shapes)
    auto = _perturbed_module("auto", shapes)
    cpu = _perturbed_module("cpu", shapes)
    calls = []
    real = MSDeformAttn._cpu_point_attention

    def spy(self, *args):
        calls.append(self.impl)
        return real(self, *args)

    monkeypatch.setattr(MSDeformAttn, "_cpu_point_attention", spy)
    out_auto = auto(query, reference, value, torch.tensor(shapes))
    out_cpu = cpu(query, reference, value, torch.tensor(shapes))
    assert calls == ["auto", "cpu"]
    torch.testing.assert_close(out_auto, out_cpu, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown deformable attention impl"):
        MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="cuda")


def test_resolve_impl_per_device():
    from mask2former.kernels import cpu_kernel_status
    from mask2former.modeling.pixel_decoder import deformable_attention as op

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_kernel_status() is None  # a C++ compiler is part of the supported set-up
    assert op.resolve_impl("auto", cpu) == "cpu"
    assert op.resolve_impl("pytorch", cpu) == "pytorch"
    assert op.resolve_impl("triton", cpu) == "triton"  # explicit names are kept (and may raise)
    # On CUDA, "auto" takes Triton exactly when it can run there, else grid_sample.
    expected = "triton" if op.triton_available(cuda) else "pytorch"
    assert op.resolve_impl("auto", cuda) == expected
    assert set(op.MS_DEFORM_ATTN_IMPLS) == {"pytorch", "fast", "cpu", "triton"}
