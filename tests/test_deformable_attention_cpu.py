"""The compiled CPU kernels: building into the kernel cache (atomic, shared by processes starting
together) and the fallback when no compiler is there (deformable attention, matcher, Swin's
window attention and the polygon rasteriser); for the deformable-attention kernels,
thread-count independence, the generic channel path, input checks, the custom operators'
registration and torch.compile. Values and gradients against the brute-force reference are in
test_ms_deform_attn.py (the "cpu" implementation); the matcher's kernel is tested in
test_matcher.py, the rasteriser's in test_rasterize.py."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mask2former.kernels import loader as cpu_kernels
from mask2former.modeling.pixel_decoder import deformable_attention as op
from mask2former.modeling.pixel_decoder import deformable_attention_cpu as cpu_op
from mask2former.modeling.pixel_decoder.deformable_attention import MSDeformAttn

# Builds the library in the cache named by the environment, then prints what it finds there.
_BUILD = textwrap.dedent(
    """
    import json, sys
    from mask2former.kernels import loader as cpu_kernels
    from mask2former.modeling import matcher
    from mask2former.modeling.pixel_decoder import deformable_attention as op
    status = cpu_kernels.cpu_kernel_status()
    cache = cpu_kernels.kernel_cache_dir()
    files = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    impl = op.resolve_impl("auto", __import__("torch").device("cpu"))
    matcher_impl = matcher._cpu_default()
    # Swin's window attention: the kernels, or the window-partition path without them
    import torch
    from mask2former.modeling.backbone.swin import SwinTransformerBlock
    swin = SwinTransformerBlock(dim=8, num_heads=2, window_size=3).attn.uses_cpu_kernel(
        torch.zeros(1, 4, 8)
    )
    # the rasteriser's choice, and a label map it paints (a 3 x 2 pixel square of class 2)
    from mask2former.data.masks import rasterize
    square = {"segmentation": [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]], "category_id": 2}
    labels = rasterize.polygons_to_label_map([square], 5, 6)
    print(json.dumps(
        {"status": status, "files": files, "impl": impl, "matcher": matcher_impl, "swin": swin,
         "rasterize": rasterize.resolve_impl(None), "label_sum": int(labels.sum())}
    ))
    """
)


def _run(env_update, *, background=False):
    env = {**os.environ, **env_update}
    cmd = [sys.executable, "-c", _BUILD]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_builds_once_into_the_cache_and_reuses_it(tmp_path):
    cache = tmp_path / "kernels"
    first, _ = _run({"MASK2FORMER_KERNEL_CACHE": str(cache)})
    assert first["status"] is None and first["impl"] == "cpu" and first["matcher"] == "cpu"
    assert first["swin"] is True
    assert first["rasterize"] == "cpu" and first["label_sum"] == 12
    # one library, no temporary file left behind
    assert len(first["files"]) == 1 and first["files"][0].endswith(".so")
    assert ".tmp" not in first["files"][0]
    library = cache / first["files"][0]
    stamp = library.stat().st_mtime_ns
    second, _ = _run({"MASK2FORMER_KERNEL_CACHE": str(cache)})
    assert second == first
    assert library.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_processes_building_at_once_all_load_a_complete_library(tmp_path):
    env = {"MASK2FORMER_KERNEL_CACHE": str(tmp_path / "kernels")}
    procs = [_run(env, background=True) for _ in range(3)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert all(r["status"] is None and r["impl"] == "cpu" for r in reports)
    # each built under its own temporary name and renamed: one library, nothing else left
    (library,) = os.listdir(tmp_path / "kernels")
    assert library.endswith(".so") and ".tmp" not in library


def test_without_a_compiler_auto_falls_back_and_says_why(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    report, stderr = _run(
        {
            "MASK2FORMER_KERNEL_CACHE": str(tmp_path / "kernels"),
            "CXX": "",
            "PATH": str(empty),
        }
    )
    assert "no C++ compiler found" in report["status"]
    assert report["impl"] == "fast" and report["matcher"] == "pytorch"
    assert report["swin"] is False
    assert report["rasterize"] == "numpy" and report["label_sum"] == 12  # the same label map
    unavailable = "the compiled CPU kernels are not available (no C++ compiler found"
    assert f"Deformable attention on CPU: {unavailable}" in stderr
    assert f"The matcher's mask costs on CPU: {unavailable}" in stderr
    assert f"Swin window attention on CPU: {unavailable}" in stderr
    assert f"Polygon rasterisation: {unavailable}" in stderr
    assert report["files"] == []


def test_a_failing_compiler_is_reported_with_its_output(tmp_path, monkeypatch):
    broken = tmp_path / "broken-c++"
    broken.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo "fake c++ 1.0" && exit 0\n'
        "echo 'cannot compile today' >&2\nexit 3\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("MASK2FORMER_KERNEL_CACHE", str(tmp_path / "kernels"))
    with pytest.raises(cpu_kernels.CPUKernelUnavailable, match="cannot compile today"):
        cpu_kernels._load.__wrapped__()
    assert not any((tmp_path / "kernels").iterdir())  # no partial library


def _inputs(n=2, shapes=((9, 11), (5, 6), (3, 3)), lq=37, m=8, d=32, points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    locations = torch.rand(n, lq, m, len(shapes), points, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(n, lq, m, len(shapes), points, generator=g)
    return value, list(shapes), locations, weights


def _forward_backward(value, shapes, locations, weights, grad_seed=1):
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = op.ms_deform_attn_cpu(inputs[0], shapes, inputs[1], inputs[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


def test_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    value, shapes, locations, weights = _inputs()
    try:
        torch.set_num_threads(1)
        one = _forward_backward(value, shapes, locations, weights)
        torch.set_num_threads(3)
        three = _forward_backward(value, shapes, locations, weights)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("d", [32, 13])
def test_vector_and_generic_channel_paths_match_pytorch(d):
    """D = 32 (the compile-time channel count of the model) and any other D."""
    value, shapes, locations, weights = _inputs(d=d, m=2)
    got = _forward_backward(value, shapes, locations, weights)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = op.ms_deform_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    expected = [out.detach()] + [t.grad for t in inputs]
    for name, a, b in zip(("out", "value", "locations", "weights"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)


def test_bad_inputs_get_clear_errors():
    value, shapes, locations, weights = _inputs(n=1, lq=3, m=2, d=4)
    with pytest.raises(TypeError, match="float32 or float64"):
        op.ms_deform_attn_cpu(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())
    with pytest.raises(TypeError, match="value is torch.float32"):
        op.ms_deform_attn_cpu(value, shapes, locations.double(), weights)
    with pytest.raises(ValueError, match="level shapes"):
        op.ms_deform_attn_cpu(value, shapes[:2], locations, weights)
    many = _inputs(n=1, lq=2, m=1, d=4, points=400)
    with pytest.raises(ValueError, match="too many"):
        op.ms_deform_attn_cpu(*many)


def test_custom_operators_are_registered_consistently():
    """Schema, fake (meta) implementation and autograd registration of the operators."""
    value, shapes, locations, weights = _inputs(n=1, shapes=((4, 5), (2, 3)), lq=6, m=2, d=4)
    flat = [x for hw in shapes for x in hw]
    ref = torch.rand(1, 6, 2, 2) * 3
    logits = torch.randn(1, 6, 2, 2 * 4)
    offsets = torch.randn(1, 6, 2, 2, 4, 2)
    for args in (
        (value, ref, offsets, logits, flat, True),
        (value, None, offsets, weights.reshape(1, 6, 2, 8), flat, False),
    ):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(cpu_op._forward_op, args)


def test_module_under_torch_compile_gives_the_eager_outputs():
    shapes = [(7, 9), (4, 5)]
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="cpu").eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 20, 32, generator=g)
    value = torch.randn(1, 83, 32, generator=g)
    reference = torch.rand(1, 20, 2, 2, generator=g)
    with torch.no_grad():
        expected = attn(query, reference, value, shapes)
        compiled = torch.compile(attn, fullgraph=True, dynamic=False)
        got = compiled(query, reference, value, shapes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
