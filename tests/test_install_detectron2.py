"""The detectron2 installer: route choice, source patches, the compiled-ops stand-in."""
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", ROOT / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inst = _load_installer()


def test_route_follows_github_reachability():
    assert inst.choose_route(None, lambda: True) == "upstream"
    assert inst.choose_route(None, lambda: False) == "pypi"


def test_forced_route_wins_and_is_validated():
    def must_not_probe():
        raise AssertionError("network probed although the route was forced")

    assert inst.choose_route("pypi", must_not_probe) == "pypi"
    assert inst.choose_route("upstream", must_not_probe) == "upstream"
    with pytest.raises(SystemExit, match="D2_INSTALL_ROUTE"):
        inst.choose_route("conda", must_not_probe)


def test_alias_fixes_replace_only_removed_aliases():
    src = (
        "a = x.astype(np.bool)\nb = np.zeros(3, dtype=np.int)\nc = np.float(1)\n"
        "d = np.bool_(1)\ne = np.int64(2)\nf = np.float32\ng = Image.LINEAR\nh = Image.ANTIALIAS\n"
        "i = np.integer\nj = np.str_\n"
    )
    out, n = inst.fix_aliases(src)
    assert n == 5
    assert "astype(bool)" in out and "dtype=int)" in out and "c = float(1)" in out
    assert "np.bool_(1)" in out and "np.int64(2)" in out and "np.float32" in out
    assert "Image.BILINEAR" in out and "Image.LANCZOS" in out
    assert "np.integer" in out and "np.str_" in out


def test_setup_py_patch_drops_extension_and_url_extra():
    setup_py = (
        'install_requires=["black==21.4b2", "yacs"],\n'
        'extras_require={"all": ["shapely",\n'
        '    "panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",\n'
        "]},\n"
        "ext_modules=get_extensions(),\n"
    )
    out = inst.patch_setup_py(setup_py)
    assert "ext_modules=[]" in out and "get_extensions()" not in out
    assert "panopticapi" not in out and "black" not in out and '"shapely"' in out
    with pytest.raises(RuntimeError, match="unexpected layout"):
        inst.patch_setup_py("setup(name='x')")


def test_patch_source_tree_writes_stub_and_fixes_files(tmp_path):
    (tmp_path / "detectron2" / "layers").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup(ext_modules=get_extensions(),)\n")
    (tmp_path / "detectron2" / "layers" / "a.py").write_text("m = np.zeros(2, dtype=np.bool)\n")
    (tmp_path / "detectron2" / "b.py").write_text("untouched = 1\n")
    summary = inst.patch_source_tree(tmp_path)
    assert summary == {"files": 1, "replacements": 1}
    assert (tmp_path / "detectron2" / "layers" / "a.py").read_text() == "m = np.zeros(2, dtype=bool)\n"
    assert (tmp_path / "detectron2" / "_C.py").read_text() == inst.SHIM_SOURCE


def test_stub_module_raises_clear_error_for_compiled_ops():
    stub = types.ModuleType("stub_C")
    exec(inst.SHIM_SOURCE, stub.__dict__)
    assert getattr(stub, inst.SHIM_MARKER) is True
    assert stub.has_cuda() is False and "not built" in stub.get_compiler_version()
    with pytest.raises(RuntimeError, match="compiled op 'box_iou_rotated' is not available"):
        stub.box_iou_rotated
    with pytest.raises(AttributeError):
        stub.__wrapped__


def test_upstream_failure_falls_back_to_pypi(monkeypatch, capsys):
    calls = []
    state = {"route": None}

    def fake_upstream(python):
        calls.append("upstream")
        raise subprocess.CalledProcessError(1, "pip")

    def fake_pypi(python):
        calls.append("pypi")
        state["route"] = "pypi"

    monkeypatch.delenv("D2_INSTALL_ROUTE", raising=False)
    monkeypatch.setattr(inst, "installed_route", lambda python: state["route"])
    monkeypatch.setattr(inst, "github_reachable", lambda timeout=5.0: True)
    monkeypatch.setattr(inst, "install_upstream", fake_upstream)
    monkeypatch.setattr(inst, "install_pypi", fake_pypi)
    assert inst.main([]) == 0
    assert calls == ["upstream", "pypi"]
    out = capsys.readouterr().out
    assert "route: upstream (GitHub reachable)" in out and "falling back to route: pypi" in out


def test_second_run_is_a_no_op(monkeypatch, capsys):
    monkeypatch.delenv("D2_INSTALL_ROUTE", raising=False)
    monkeypatch.setattr(inst, "installed_route", lambda python: "pypi")

    def fail(*args, **kwargs):
        raise AssertionError("reinstalled although detectron2 is present")

    monkeypatch.setattr(inst, "install_pypi", fail)
    monkeypatch.setattr(inst, "install_upstream", fail)
    monkeypatch.setattr(inst, "github_reachable", fail)
    assert inst.main([]) == 0
    assert "already installed (route: pypi)" in capsys.readouterr().out


def test_installed_detectron2_matches_reported_route():
    route = inst.installed_route(sys.executable)
    assert route in ("upstream", "pypi")
    import detectron2._C as compiled

    assert bool(getattr(compiled, inst.SHIM_MARKER, False)) == (route == "pypi")
