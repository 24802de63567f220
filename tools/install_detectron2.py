#!/usr/bin/env python
"""Install detectron2 into the current Python environment, by one of two routes.

* ``upstream``: detectron2's GitHub source at a pinned commit, built with its compiled ops
  (``pip install --no-build-isolation git+https://github.com/...@<commit>``). Used when GitHub is
  reachable.
* ``pypi``: PyPI's ``pb1-detectron2==0.6`` source distribution, which lacks detectron2's C++ sources
  and predates NumPy 1.24 / Pillow 10. It is patched in a temporary copy before installation:
  the compiled ops are left out behind a ``detectron2/_C.py`` module that raises a clear error
  when a rotated-box / deformable-convolution / fast-COCO-eval op is called (none is used for
  semantic segmentation), the removed aliases ``np.bool/np.int/np.float/np.str/np.object`` and
  ``PIL.Image.LINEAR/ANTIALIAS`` are replaced by their modern spellings, and
  ``detectron2/engine/launch.py`` starts several processes on a machine without CUDA with the gloo
  backend (as upstream's ``launch`` does) instead of asserting CUDA.

The chosen route is printed. A second run finds the installation and returns at once, unless it
is a pypi-route installation of an older patch level (``PYPI_PATCH_LEVEL``), which is upgraded.
Set ``D2_INSTALL_ROUTE=upstream|pypi`` to force a route.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM_REPO = "https://github.com/facebookresearch/detectron2.git"
UPSTREAM_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
PYPI_REQUIREMENT = "pb1-detectron2==0.6"
ROUTES = ("upstream", "pypi")

# Marker attribute of the replacement ``detectron2._C`` module written by the pypi route.
SHIM_MARKER = "WITHOUT_COMPILED_OPS"
# Version of the pypi-route patches, recorded in the stand-in module as ``PATCH_LEVEL``:
#   1: compiled ops left out, NumPy / Pillow aliases replaced (the stand-in had no PATCH_LEVEL);
#   2: ``launch`` falls back to gloo without CUDA.
# An installation of a lower level is reinstalled by the next run (``make install``).
PYPI_PATCH_LEVEL = 2

SHIM_SOURCE = '''"""Stand-in for detectron2's compiled extension
(written by tools/install_detectron2.py).

This detectron2 was installed from PyPI's pb1-detectron2 0.6 source distribution, which does not
contain the C++/CUDA sources. Semantic segmentation needs none of the compiled ops; calling one
raises a RuntimeError naming it. Install detectron2 from GitHub to get them.
"""

WITHOUT_COMPILED_OPS = True
PATCH_LEVEL = {patch_level}


def get_compiler_version():
    return "not built (pb1-detectron2 0.6 sdist has no C++ sources)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"detectron2 compiled op '{name}' is not available: this detectron2 was installed from "
        "PyPI's pb1-detectron2 0.6 source, which has no C++ sources. Rotated boxes, deformable "
        "convolution and the fast COCO evaluator need the GitHub build "
        "(D2_INSTALL_ROUTE=upstream python tools/install_detectron2.py on a machine that "
        "reaches GitHub)."
    )
'''.replace("{patch_level}", str(PYPI_PATCH_LEVEL))

# (pattern, replacement) applied to every .py file of the pypi sdist.
ALIAS_FIXES = [
    (re.compile(r"\bnp\.bool\b(?!_)"), "bool"),
    (re.compile(r"\bnp\.int\b(?!_)"), "int"),
    (re.compile(r"\bnp\.float\b(?!_)"), "float"),
    (re.compile(r"\bnp\.str\b(?!_)"), "str"),
    (re.compile(r"\bnp\.object\b(?!_)"), "object"),
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR"),
    (re.compile(r"\bImage\.ANTIALIAS\b"), "Image.LANCZOS"),
]


# (old, new) replacements in pb1-detectron2 0.6's detectron2/engine/launch.py, each expected once:
# without CUDA the workers use the gloo backend and select no CUDA device, as upstream's launch.
LAUNCH_PATCHES = [
    (
        "    assert torch.cuda.is_available(), "
        '"cuda is not available. Please check your installation."\n',
        "    has_gpu = torch.cuda.is_available()\n"
        "    if has_gpu:\n"
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n",
    ),
    ('            backend="NCCL",\n', '            backend="NCCL" if has_gpu else "GLOO",\n'),
    (
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n        torch.cuda.set_device(local_rank)\n",
    ),
]


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def github_reachable(timeout=5.0):
    """True if a TCP connection to github.com:443 can be opened."""
    try:
        with socket.create_connection(("github.com", 443), timeout=timeout):
            return True
    except OSError:
        return False


def choose_route(forced, reachable):
    """The route to take: ``forced`` if given (validated), else upstream iff GitHub is reachable."""
    if forced:
        if forced not in ROUTES:
            raise SystemExit(f"D2_INSTALL_ROUTE must be one of {ROUTES}, got {forced!r}")
        return forced
    return "upstream" if reachable() else "pypi"


def installed_route(python):
    """'upstream' / 'pypi' for an importable detectron2 in ``python``'s environment, else None."""
    found = installed_version(python)
    return found and found[0]


def installed_version(python):
    """(route, patch level) of an importable detectron2 in ``python``'s environment, else None.

    The patch level is that of the pypi-route stand-in (1 for stand-ins that predate the
    ``PATCH_LEVEL`` attribute); it is 0 for the upstream route.
    """
    code = (
        "import detectron2, detectron2._C as c\n"
        f"pypi = getattr(c, {SHIM_MARKER!r}, False)\n"
        # vars(): the stand-in's __getattr__ raises for every missing name
        "print('pypi' if pypi else 'upstream', vars(c).get('PATCH_LEVEL', 1) if pypi else 0)\n"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    route, level = res.stdout.strip().splitlines()[-1].split()
    return route, int(level)


def fix_aliases(text):
    """Replace removed NumPy / Pillow aliases. Returns (new_text, number_of_replacements)."""
    total = 0
    for pattern, repl in ALIAS_FIXES:
        text, n = pattern.subn(repl, text)
        total += n
    return text, total


def patch_setup_py(text):
    """Drop the compiled extension and the direct-URL extra from pb1-detectron2's setup.py."""
    new = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
    new = re.sub(r'\s*"panopticapi @ [^"]*",', "", new)
    new = new.replace('"black==21.4b2",', "")
    if "ext_modules=[]" not in new:
        raise RuntimeError("setup.py of pb1-detectron2 has an unexpected layout; cannot patch it")
    return new


def patch_launch_py(text):
    """Make pb1-detectron2's ``launch`` use gloo when CUDA is not available (as upstream)."""
    for old, new in LAUNCH_PATCHES:
        if text.count(old) != 1:
            raise RuntimeError(
                "detectron2/engine/launch.py of pb1-detectron2 has an unexpected layout; "
                f"cannot patch it (expected once: {old.strip()!r})"
            )
        text = text.replace(old, new)
    return text


def patch_source_tree(root):
    """Apply the pypi-route fixes to an extracted pb1-detectron2 tree. Returns a summary dict."""
    root = Path(root)
    setup_py = root / "setup.py"
    setup_py.write_text(patch_setup_py(setup_py.read_text()))
    n_files = n_repl = 0
    for py in sorted((root / "detectron2").rglob("*.py")):
        text = py.read_text()
        new, n = fix_aliases(text)
        if n:
            py.write_text(new)
            n_files += 1
            n_repl += n
    launch_py = root / "detectron2" / "engine" / "launch.py"
    launch_py.write_text(patch_launch_py(launch_py.read_text()))
    (root / "detectron2" / "_C.py").write_text(SHIM_SOURCE)
    return {"files": n_files, "replacements": n_repl}


def pip(python, *args):
    cmd = [python, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def install_upstream(python):
    pip(
        python,
        "install",
        "--no-build-isolation",
        "--no-deps",
        f"git+{UPSTREAM_REPO}@{UPSTREAM_COMMIT}",
    )


def install_pypi(python):
    with tempfile.TemporaryDirectory(prefix="d2-pypi-") as tmp:
        tmp = Path(tmp)
        # pip < 25 still accepts the sdist's direct-URL extra when preparing its metadata.
        pip(
            python,
            "download",
            "--no-deps",
            "--no-build-isolation",
            "-d",
            str(tmp),
            PYPI_REQUIREMENT,
        )
        archives = list(tmp.glob("pb1*detectron2-0.6.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one pb1-detectron2 sdist in {tmp}, found {archives}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6"
        summary = patch_source_tree(src)
        log(
            f"patched {summary['replacements']} removed NumPy/Pillow aliases in "
            f"{summary['files']} files; "
            "launch falls back to gloo without CUDA; "
            "compiled ops replaced by detectron2/_C.py stand-in"
        )
        shutil.rmtree(src / "pb1_detectron2.egg-info", ignore_errors=True)
        # --force-reinstall: an older patch level of the same version 0.6 is replaced
        pip(python, "install", "--no-build-isolation", "--no-deps", "--force-reinstall", str(src))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of the target environment"
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = parser.parse_args(argv)

    forced = os.environ.get("D2_INSTALL_ROUTE") or None
    found = installed_version(args.python)
    current, level = found or (None, 0)
    outdated = current == "pypi" and level < PYPI_PATCH_LEVEL
    if current and not args.force and not outdated and (forced is None or forced == current):
        log(f"detectron2 already installed (route: {current}); nothing to do")
        return 0

    if outdated and not args.force and forced is None:
        # same route as before: upgrading the patches needs no network probe
        route = "pypi"
        log(
            f"detectron2 installed by the pypi route at patch level {level} < {PYPI_PATCH_LEVEL}; "
            "reinstalling (route: pypi)"
        )
    else:
        route = choose_route(forced, github_reachable)
        reason = (
            "forced by D2_INSTALL_ROUTE"
            if forced
            else "GitHub reachable"
            if route == "upstream"
            else "GitHub unreachable"
        )
        log(f"route: {route} ({reason})")
    if route == "upstream":
        try:
            install_upstream(args.python)
        except subprocess.CalledProcessError:
            if forced:
                raise
            log("upstream build failed; falling back to route: pypi")
            route = "pypi"
            install_pypi(args.python)
    else:
        install_pypi(args.python)

    got = installed_version(args.python)
    if got is None or got[0] != route:
        raise SystemExit(f"detectron2 does not import after the {route} route (found {got})")
    if route == "pypi" and got[1] != PYPI_PATCH_LEVEL:
        raise SystemExit(
            f"detectron2 reports patch level {got[1]} after the pypi route, "
            f"expected {PYPI_PATCH_LEVEL}"
        )
    log(f"detectron2 installed (route: {route})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
