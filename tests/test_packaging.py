"""The project as a package: declared dependencies match the pinned requirements, and every
console command (and ``python -m mask2former.cli.<module>``) runs from outside the checkout."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# Pinned in the requirements files but not needed at run time: installers, build and dev tools.
NOT_RUNTIME = {"pip", "setuptools", "wheel", "cython", "pytest", "ruff"}
DEV_TOOLS = {"pytest", "ruff"}


def _project():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _pins():
    """``{name: version}`` of the ``name==version`` lines of the requirements files."""
    pins = {}
    for name in ("requirements.txt", "requirements-build.txt"):
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            if match:
                pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _requirements(lines):
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def test_dependencies_are_ranges_around_the_pins():
    project = _project()
    pins = _pins()
    declared = _requirements(project["dependencies"])
    extras = {k: _requirements(v) for k, v in project["optional-dependencies"].items()}
    assert set(extras["dev"]) == DEV_TOOLS
    assert "detectron2" not in declared  # not on PyPI: installed before the project
    # every pin is declared once: a dependency or an optional feature's (or a dev tool)
    groups = [declared, *extras.values()]
    names = [name for group in groups for name in group]
    assert len(names) == len(set(names))
    runtime_pins = {name for name in pins if name not in NOT_RUNTIME}
    assert set(names) == runtime_pins | DEV_TOOLS
    for group in groups:
        for name, requirement in group.items():
            assert requirement.specifier.contains(pins[name]), (name, str(requirement))
            assert "<" in str(requirement.specifier), f"{name}: no upper bound"


def _commands():
    return _project()["scripts"]


def test_entry_points_name_package_functions():
    for command, target in _commands().items():
        module_name, function = target.split(":")
        assert module_name.startswith("mask2former.cli."), command
        assert callable(getattr(importlib.import_module(module_name), function)), command


def test_console_commands_run_from_outside_the_checkout(tmp_path):
    bin_dir = Path(sys.executable).parent
    commands = _commands()
    missing = [c for c in commands if not (bin_dir / c).exists()]
    assert not missing, (
        f"console commands {missing} are not installed in {bin_dir}: reinstall the project with "
        "pip install --no-build-isolation --no-deps -e ."
    )
    runs = {c: [str(bin_dir / c), "--help"] for c in commands}
    module = next(iter(commands.values())).split(":")[0]
    runs["python -m " + module] = [sys.executable, "-m", module, "--help"]
    # all at once: each start imports torch and Detectron2
    processes = {
        name: subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in runs.items()
    }
    for name, process in processes.items():
        out, err = process.communicate()
        assert process.returncode == 0, f"{name} --help failed:\n{err[-2000:]}"
        assert out.startswith("usage:"), (name, out[:200])


def test_importing_the_model_packages_loads_no_toolkit_module():
    """Registration is the only side effect of ``import mask2former`` (and of the extensions):
    no dataset, inference or post-processing module is loaded."""
    code = (
        "import sys, mask2former, semask, dinat\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('mask2former.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "mask2former.modeling.meta_arch.mask_former_model" in out  # registered
    toolkit = ("data", "inference", "postprocess", "engine", "evaluation", "report", "loop")
    loaded = [m for m in out if m.split(".")[1] in toolkit]
    assert not loaded, loaded


def test_the_cpu_kernel_sources_are_package_data():
    """The C++ sources and headers the kernel library is built from ship with the package."""
    from fnmatch import fnmatch

    from mask2former import kernels as cpu_kernels

    with open(REPO / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    package_dir = REPO / "mask2former" / "kernels"
    globs = package_data["mask2former.kernels"]
    files = cpu_kernels.SOURCES + cpu_kernels.HEADERS
    assert files and all(path.is_file() for path in files)
    for path in files:
        relative = path.relative_to(package_dir).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in globs), relative
    # and every file in the kernel folder is one the library is built from
    assert sorted(p.name for p in (package_dir / "csrc").iterdir()) == sorted(p.name for p in files)
