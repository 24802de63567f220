"""The CPU runtime settings (mask2former.engine.cpu_runtime): denormals flushed to zero and freed
host memory kept for reuse take effect in the process that applies them (each case in its own
subprocess: they are process-wide), the config keys turn them off, and the speed they exist for
(a product of denormals, page faults of a re-allocated tensor) is checked by its cause."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

# Allocates and frees a 64 MiB tensor (filled, so its pages are touched) twelve times, and
# returns the page faults of the last four times. (glibc serves the aligned allocations of
# PyTorch with a small remainder split off behind each block; until those remainders are
# consolidated the freed block cannot merge with its neighbours, so the heap takes a few
# repetitions, depending on its layout, to settle: 1 to 6 here.)
_SCRIPT = textwrap.dedent(
    """
    import json, logging, resource, sys
    import torch
    from mask2former.engine import build_cfg, setup_cpu_runtime

    def faults_of_reallocation():
        faults = []
        for _ in range(12):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.ones(16 << 20)
            del x
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sum(faults[-4:])

    def denormal_survives():
        return (torch.tensor([1e-40]) * 1.0).item() != 0.0

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    report = {"faults_before": faults_of_reallocation(), "denormal_before": denormal_survives()}
    cfg = build_cfg("", sys.argv[1:])
    report["applied"] = setup_cpu_runtime(cfg)
    report["faults_after"] = faults_of_reallocation()
    report["denormal_after"] = denormal_survives()
    print(json.dumps(report))
    """
)


def _run(*opts):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *opts], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_defaults_flush_denormals_and_keep_freed_memory():
    report, log = _run()
    assert report["denormal_before"] and not report["denormal_after"]
    assert report["applied"]["flush_denormals"] is True
    assert "CPU runtime: flush_denormals=True" in log
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert report["applied"]["reuse_host_memory"] is True
        # glibc maps a 64 MiB block anew each time (16k pages faulted in); then reuses it
        assert report["faults_before"] > 40000
        assert report["faults_after"] < 1000
    else:
        assert report["applied"]["reuse_host_memory"] is False


def test_config_keys_turn_them_off():
    report, _ = _run("FLUSH_DENORMALS", "False", "REUSE_HOST_MEMORY", "False")
    assert report["applied"] == {"flush_denormals": False, "reuse_host_memory": False}
    assert report["denormal_before"] and report["denormal_after"]
    if platform.system() == "Linux":
        assert report["faults_after"] > 40000


def test_flushing_reaches_the_matrix_product_kernels():
    """What makes products of denormals fast where the CPU takes a slow path for them (Intel:
    several times slower unflushed; AMD Zen: no penalty): the BLAS kernels themselves see
    denormal operands and results as zero once flushing is on, not only element-wise code."""
    script = textwrap.dedent(
        """
        import torch
        from mask2former.engine.cpu_runtime import flush_denormals
        torch.set_num_threads(1)
        a, b = torch.full((64, 64), 1e-39), torch.ones(64, 64)  # denormal, normal
        tiny = torch.full((64, 64), 1e-20)  # normal, but its products are denormal
        before = ((a @ b).abs().max().item(), (tiny @ tiny).abs().max().item())
        flush_denormals()
        after = ((a @ b).abs().max().item(), (tiny @ tiny).abs().max().item())
        print(*before, *after)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    operand_before, result_before, operand_after, result_after = map(
        float, proc.stdout.strip().splitlines()[-1].split()
    )
    # unflushed: 64 * 1e-39 and 64 * 1e-40 (denormal operands and results kept)
    assert operand_before == pytest.approx(6.4e-38, rel=1e-3)
    assert 0 < result_before < 1.2e-38
    # flushed: denormal operands read as 0, denormal results written as 0
    assert operand_after == 0 and result_after == 0
