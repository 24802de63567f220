"""Neighborhood attention: every implementation against the brute-force reference (float64), the
reference against NATTEN's own index definitions, and NATTEN 0.14's small-input padding."""

import logging

import pytest
import torch
from torch.nn import functional as F

from dinat import neighborhood_attention as na
from dinat.neighborhood_attention import (
    NeighborhoodAttention2D,
    dispatch,
    flex,
    na2d_flex,
    na2d_natten,
    na2d_reference,
    na2d_tiled,
    reference,
    resolve_attention_impl,
    tiled,
)

# Eager flex attention on CPU is expected here (PyTorch warns that it is unfused).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# (batch, height, width, heads, kernel, dilation): odd sizes, non-square inputs, dilations that do
# and do not divide the size, kernel equal to the (group) length, several heads, batch > 1.
CASES = [
    (2, 9, 13, 2, 3, 1),
    (1, 7, 7, 2, 7, 1),  # kernel == length
    (1, 23, 17, 3, 5, 2),  # dilation divides neither side
    (2, 20, 21, 1, 3, 3),
    (1, 15, 22, 2, 5, 3),  # height: every group has length 5 == kernel
    (1, 26, 19, 2, 7, 1),
    (1, 33, 29, 2, 3, 5),
]


def _case_id(case):
    return "b{}_{}x{}_h{}_k{}_d{}".format(*case)


CASE_IDS = [_case_id(c) for c in CASES]


def _inputs(batch, height, width, heads, kernel, dim=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, height, width, heads, dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=dtype)
    grad_out = torch.randn(batch, height, width, heads, dim, generator=g, dtype=dtype)
    return q, k, v, rpb, grad_out


def _op(fn, kernel, dilation, **kwargs):
    """``fn`` as a function of (q, k, v, rpb)."""
    return lambda q, k, v, rpb: fn(q, k, v, rpb, kernel, dilation, **kwargs)


def _forward_backward(fn, q, k, v, rpb, grad_out):
    """Output and gradients of q, k, v (and rpb) of ``fn(q, k, v, rpb)``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    rpb_leaf = rpb.detach().clone().requires_grad_(True) if rpb is not None else None
    out = fn(*leaves, rpb_leaf)
    (out * grad_out).sum().backward()
    grads = [t.grad for t in leaves] + ([rpb_leaf.grad] if rpb is not None else [])
    return out.detach(), grads


# ----------------------------------------------------------------------------- NATTEN definitions
def _natten_window_start(index, length, kernel, dilation):
    """NATTEN (<= 0.17) CPU kernel's get_window_start, restated."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel * dilation
    return index - half * dilation


def _natten_pb_start(index, length, kernel, dilation):
    """NATTEN (<= 0.17) CPU kernel's get_pb_start (rpb index of the window's first key),
    restated."""
    half = kernel // 2
    if dilation <= 1:
        left = (index < half) * (half - index)
        right = (index + half >= length) * (length - index - 1 - half)
        return half + left + right
    if index - half * dilation < 0:
        return kernel - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


AXES = [
    (7, 7, 1),
    (13, 3, 1),
    (13, 5, 1),
    (17, 5, 2),
    (20, 3, 3),
    (15, 5, 3),
    (33, 3, 5),
    (154, 11, 14),
    (160, 11, 14),
]


@pytest.mark.parametrize("length,kernel,dilation", AXES)
def test_reference_neighbours_follow_natten_definitions(length, kernel, dilation):
    keys, bias_index = reference._neighbors_1d(length, kernel, dilation)
    for i in range(length):
        start = _natten_window_start(i, length, kernel, dilation)
        pb = _natten_pb_start(i, length, kernel, dilation)
        assert keys[i].tolist() == [start + j * dilation for j in range(kernel)]
        assert bias_index[i].tolist() == [pb + j for j in range(kernel)]


def _dense_natten_attention(q, k, v, rpb, kernel, dilation):
    """Full H*W x H*W attention, masked and biased from NATTEN's index definitions."""
    batch, height, width, heads, dim = q.shape
    tokens = height * width
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    bias = torch.zeros(heads, tokens, tokens, dtype=q.dtype)
    for i in range(height):
        hs = _natten_window_start(i, height, kernel, dilation)
        hp = _natten_pb_start(i, height, kernel, dilation)
        for j in range(width):
            ws = _natten_window_start(j, width, kernel, dilation)
            wp = _natten_pb_start(j, width, kernel, dilation)
            for a in range(kernel):
                for b in range(kernel):
                    key = (hs + a * dilation) * width + ws + b * dilation
                    mask[i * width + j, key] = True
                    bias[:, i * width + j, key] = rpb[:, hp + a, wp + b]
    qt, kt, vt = (x.reshape(batch, tokens, heads, -1).transpose(1, 2) for x in (q, k, v))
    logits = (qt * dim**-0.5) @ kt.transpose(-1, -2) + bias
    attn = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return (attn @ vt).transpose(1, 2).reshape(batch, height, width, heads, -1)


@pytest.mark.parametrize("case", CASES[:5], ids=CASE_IDS[:5])
def test_reference_matches_dense_natten_attention(case):
    batch, height, width, heads, kernel, dilation = case
    q, k, v, rpb, _ = _inputs(batch, height, width, heads, kernel)
    expected = _dense_natten_attention(q, k, v, rpb, kernel, dilation)
    out = na2d_reference(q, k, v, rpb, kernel, dilation)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- tiled path
# (use rpb, max_tile, max_logits): the default tiling; small tiles (more tiles and pattern runs,
# several samples per chunk); chunks of tile rows of one sample.
TILED_SETTINGS = {
    "default": (True, 8, 1 << 22),
    "default_no_rpb": (False, 8, 1 << 22),
    "small_tiles": (True, 3, 4000),
    "row_chunks": (True, 4, 300),
}


# Chunks of one tile row are many tiny calls with 25 dilation groups: left out for d = 5.
TILED_PARAMS = [
    pytest.param(case, setting, id=f"{case_id}-{setting}")
    for case, case_id in zip(CASES, CASE_IDS)
    for setting in TILED_SETTINGS
    if not (setting == "row_chunks" and case[-1] == 5)
]


@pytest.mark.parametrize("case,setting", TILED_PARAMS)
def test_tiled_matches_reference(case, setting):
    batch, height, width, heads, kernel, dilation = case
    use_rpb, max_tile, max_logits = TILED_SETTINGS[setting]
    q, k, v, rpb, grad_out = _inputs(batch, height, width, heads, kernel)
    rpb = rpb if use_rpb else None
    ref_out, ref_grads = _forward_backward(
        _op(na2d_reference, kernel, dilation), q, k, v, rpb, grad_out
    )
    tiled = _op(na2d_tiled, kernel, dilation, max_tile=max_tile, max_logits=max_logits)
    out, grads = _forward_backward(tiled, q, k, v, rpb, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    with torch.no_grad():  # inference takes PyTorch's fused attention kernel instead
        out = tiled(q, k, v, rpb)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "length,kernel,max_tile", [(128, 11, 8), (129, 11, 8), (40, 7, 3), (12, 11, 8), (100, 3, 8)]
)
def test_tiling_windows_inside_key_regions(length, kernel, max_tile):
    """Every real query's window lies inside its tile's key region (the tiled path's invariant)."""
    t = tiled._axis_tiling(length, kernel, max_tile)
    pattern_of_tile = [p for count, p in t.runs for _ in range(count)]
    assert len(pattern_of_tile) == t.num_tiles
    covered = 0
    for tile in range(t.num_tiles):
        for a in range(t.tile):
            query = t.first_query + tile * t.tile + a
            if not 0 <= query < length:
                continue
            covered += 1
            start = min(max(query - kernel // 2, 0), length - kernel)
            region_start = t.first_key + tile * t.tile
            assert region_start <= start and start + kernel <= region_start + t.region
            code = t.patterns[pattern_of_tile[tile], a]
            assert int((code >= 0).sum()) == kernel
    assert covered == length


def test_tiled_float32_close_to_float64_reference():
    q, k, v, rpb, _ = _inputs(2, 30, 27, 3, 7, dim=16)
    expected = na2d_reference(q, k, v, rpb, 7, 2)
    out = na2d_tiled(q.float(), k.float(), v.float(), rpb.float(), 7, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_inputs_smaller_than_window_raise():
    q, k, v, rpb, _ = _inputs(1, 9, 12, 1, 3)
    for fn in (na2d_reference, na2d_tiled, na2d_flex):
        with pytest.raises(ValueError, match="kernel_size \\* dilation"):
            fn(q, k, v, rpb, 3, 4)  # needs 12 rows, has 9


# ----------------------------------------------------------------------------- flex path
FLEX_CASES = [CASES[0], CASES[2], CASES[4], (1, 12, 16, 2, 3, 4)]
FLEX_IDS = [_case_id(c) for c in FLEX_CASES]


@pytest.mark.parametrize("use_rpb", [True, False], ids=["rpb", "no_rpb"])
@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_IDS)
def test_flex_forward_matches_reference(case, use_rpb):
    """Real (eager, uncompiled) flex_attention on CPU; PyTorch has no flex backward on CPU."""
    batch, height, width, heads, kernel, dilation = case
    q, k, v, rpb, _ = _inputs(batch, height, width, heads, kernel)
    rpb = rpb if use_rpb else None
    out = na2d_flex(q, k, v, rpb, kernel, dilation, compile=False)
    expected = na2d_reference(q, k, v, rpb, kernel, dilation)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def _dense_flex_semantics(q, k, v, rpb, kernel, dilation):
    """Attention with the flex path's own score_mod / mask_mod evaluated on dense index grids
    (what flex attention computes, differentiable on CPU)."""
    batch, height, width, heads, dim = q.shape
    score_mod, mask_mod = flex._flex_mods(height, width, kernel, dilation, rpb, q.device)
    qt, kt, vt = (x.flatten(1, 2).transpose(1, 2) for x in (q, k, v))  # [B, heads, L, D]
    tokens = torch.arange(height * width)
    b_idx = torch.arange(batch)[:, None, None, None]
    h_idx = torch.arange(heads)[None, :, None, None]
    q_idx, kv_idx = tokens[None, None, :, None], tokens[None, None, None, :]
    scores = (qt @ kt.transpose(-1, -2)) * dim**-0.5
    if score_mod is not None:
        scores = score_mod(scores, b_idx, h_idx, q_idx, kv_idx)
    scores = scores.masked_fill(~mask_mod(b_idx, h_idx, q_idx, kv_idx), float("-inf"))
    return (scores.softmax(-1) @ vt).transpose(1, 2).reshape(batch, height, width, heads, -1)


@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_IDS)
def test_flex_mods_forward_backward_match_reference(case):
    batch, height, width, heads, kernel, dilation = case
    q, k, v, rpb, grad_out = _inputs(batch, height, width, heads, kernel)
    ref_out, ref_grads = _forward_backward(
        _op(na2d_reference, kernel, dilation), q, k, v, rpb, grad_out
    )
    out, grads = _forward_backward(
        _op(_dense_flex_semantics, kernel, dilation), q, k, v, rpb, grad_out
    )
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex attention needs CUDA")
@pytest.mark.parametrize("case", [(2, 40, 36, 2, 7, 2), (1, 33, 29, 2, 5, 3)])
def test_flex_compiled_cuda_forward_backward(case):
    batch, height, width, heads, kernel, dilation = case
    inputs = _inputs(batch, height, width, heads, kernel, dim=32, dtype=torch.float32)
    ref_out, ref_grads = _forward_backward(
        _op(na2d_reference, kernel, dilation), *(t.double() for t in inputs)
    )
    out, grads = _forward_backward(_op(na2d_flex, kernel, dilation), *(t.cuda() for t in inputs))
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=0, atol=2e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------- NATTEN path
@pytest.mark.parametrize("case", [CASES[0], CASES[2], FLEX_CASES[-1]], ids=_case_id)
def test_natten_forward_matches_reference_without_rpb(case):
    """natten.functional.na2d (here through NATTEN's uncompiled flex backend on CPU, float32)."""
    batch, height, width, heads, kernel, dilation = case
    q, k, v, _, _ = _inputs(batch, height, width, heads, kernel, dim=8)
    expected = na2d_reference(q, k, v, None, kernel, dilation)
    out = na2d_natten(q.float(), k.float(), v.float(), None, kernel, dilation)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_natten_rejects_rpb():
    q, k, v, rpb, _ = _inputs(1, 9, 9, 1, 3)
    with pytest.raises(ValueError, match="positional bias"):
        na2d_natten(q, k, v, rpb, 3, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NATTEN's fused kernels need a CUDA GPU")
def test_natten_cuda_forward_backward_without_rpb():
    q, k, v, _, grad_out = _inputs(2, 40, 36, 2, 7, dim=32, dtype=torch.float32)
    ref_out, ref_grads = _forward_backward(
        _op(na2d_reference, 7, 2), q.double(), k.double(), v.double(), None, grad_out.double()
    )
    out, grads = _forward_backward(
        _op(na2d_natten, 7, 2), q.cuda(), k.cuda(), v.cuda(), None, grad_out.cuda()
    )
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=0, atol=2e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------- dispatch
def test_auto_resolution_and_logging_once(caplog):
    dispatch._LOGGED_CHOICES.clear()
    with caplog.at_level(logging.INFO, logger="dinat.neighborhood_attention"):
        assert resolve_attention_impl("auto", "cpu", True) == "tiled"
        assert resolve_attention_impl("auto", "cpu", True) == "tiled"
        assert resolve_attention_impl("auto", "cpu", False) == "tiled"  # NATTEN has no CPU kernels
        assert resolve_attention_impl("auto", "cuda", True) == "flex"
        assert resolve_attention_impl("flex", "cpu", True) == "flex"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages
    assert "'tiled' (requested 'auto') on cpu, rpb on" in messages[0]
    with pytest.raises(ValueError, match="positional bias"):
        resolve_attention_impl("natten", "cpu", True)
    with pytest.raises(ValueError, match="Unknown"):
        resolve_attention_impl("cpu", "cpu", True)


def test_natten_fused_only_on_cuda():
    assert not na.natten_fused_available("cpu")


# ----------------------------------------------------------------------------- module (+ padding)
def _module(dim, heads, kernel, dilation, impl="reference", **kwargs):
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(dim, heads, kernel, dilation, impl=impl, **kwargs).double()
    with torch.no_grad():
        m.rpb.normal_()  # larger than the 0.02 init, so a wrong bias index shows
    return m


def _explicit_module_forward(m, x, padded_h, padded_w):
    """Zero-pad to padded_h x padded_w, qkv, reference attention, crop, proj."""
    batch, height, width, channels = x.shape
    xp = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    qkv = m.qkv(xp).view(batch, padded_h, padded_w, 3, m.num_heads, m.head_dim)
    q, k, v = qkv.unbind(3)
    out = na2d_reference(q, k, v, m.rpb, m.kernel_size, m.dilation)
    return m.proj(out.reshape(batch, padded_h, padded_w, channels)[:, :height, :width])


@pytest.mark.parametrize(
    "height,width,kernel,dilation",
    [(5, 9, 3, 2), (4, 4, 5, 1), (10, 3, 3, 3), (11, 13, 3, 4)],
)
@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_small_inputs_zero_padded_before_qkv_like_natten_014(height, width, kernel, dilation, impl):
    m = _module(12, 3, kernel, dilation, impl=impl)
    window = kernel * dilation
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, height, width, 12, dtype=torch.float64, generator=g)
    expected = _explicit_module_forward(m, x, max(height, window), max(width, window))
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_small_input_without_padding_raises():
    m = _module(8, 2, 3, 2, pad_small_inputs=False)
    with pytest.raises(ValueError, match="pad_small_inputs"):
        m(torch.zeros(1, 5, 9, 8, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["tiled", "flex"])
def test_module_implementations_agree(impl):
    x = torch.randn(2, 14, 17, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _module(16, 4, 5, 2, impl="reference")
    other = _module(16, 4, 5, 2, impl=impl)
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref(x), rtol=0, atol=1e-12)


def test_auto_flex_falls_back_to_tiled_when_compiling_fails(caplog):
    q, k, v, rpb, _ = _inputs(1, 9, 8, 2, 3, dtype=torch.float32)
    q.requires_grad_(True)
    calls = []

    def failing_flex(*args):
        calls.append(args[0].shape)
        raise RuntimeError(
            "No valid triton configs. OutOfResources: out of resource: shared memory"
        )

    with caplog.at_level(logging.WARNING, logger="dinat"):
        out = dispatch._na2d_auto_flex(q, k, v, rpb, 3, 2, None, flex_fn=failing_flex)
        again = dispatch._na2d_auto_flex(q, k, v, rpb, 3, 2, None, flex_fn=failing_flex)
    expected = na2d_reference(q, k, v, rpb, 3, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1  # probed once; the failure is remembered for this configuration
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "'tiled'" in warnings[0] and "OutOfResources" in warnings[0]
    out.sum().backward()  # the fallback is differentiable
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_auto_flex_probes_each_configuration_once_and_then_uses_flex():
    q, k, v, rpb, _ = _inputs(1, 7, 6, 2, 3, dtype=torch.float32)
    calls = []

    def eager_flex(*args):
        calls.append(args[0].shape)
        return na2d_flex(*args, compile=False)

    with torch.no_grad():
        out = dispatch._na2d_auto_flex(q, k, v, rpb, 3, 1, None, flex_fn=eager_flex)
        dispatch._na2d_auto_flex(q, k, v, rpb, 3, 1, None, flex_fn=eager_flex)
    assert len(calls) == 3  # one probe, then the two real calls
    torch.testing.assert_close(out, na2d_reference(q, k, v, rpb, 3, 1), rtol=1e-5, atol=1e-5)


def test_compiled_flex_variants_keep_the_recompile_limit_above_their_count():
    config = torch._dynamo.config
    saved = (
        config.recompile_limit,
        config.accumulated_recompile_limit,
        set(flex._COMPILED_VARIANTS),
    )
    try:
        flex._COMPILED_VARIANTS.clear()
        config.recompile_limit = 8
        variants = set()
        # A DiNAT-like network: 4 levels of head counts, training and evaluation, rpb on.
        for level, heads in enumerate((6, 12, 24, 48)):
            size = 32 >> level
            x = torch.zeros(2, size, size, heads, 32)
            bias = torch.zeros(heads, 13, 13, requires_grad=True)
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    variant = flex.flex_variant(x, bias, 7, 1)
                variants.add(variant)
                flex._reserve_compilation(variant)
                flex._reserve_compilation(variant)  # the same variant again counts once
        assert len(variants) == 8 and flex.compiled_variants() == 8
        assert config.recompile_limit >= 8 + flex._RECOMPILE_HEADROOM
        assert config.accumulated_recompile_limit >= config.recompile_limit
        # what makes a new compilation: dtype, the bias, the head count; not the map's values
        x = torch.zeros(2, 8, 8, 6, 32)
        assert flex.flex_variant(x, None, 7, 1) != flex.flex_variant(x, bias[:6], 7, 1)
        assert flex.flex_variant(x.half(), None, 7, 1) != flex.flex_variant(x, None, 7, 1)
        assert flex.flex_variant(x, None, 7, 1) == flex.flex_variant(x + 1, None, 7, 3)
    finally:
        config.recompile_limit, config.accumulated_recompile_limit = saved[:2]
        flex._COMPILED_VARIANTS.clear()
        flex._COMPILED_VARIANTS.update(saved[2])
