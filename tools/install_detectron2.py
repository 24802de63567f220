#!/usr/bin/env python
"""Install detectron2 into the current Python environment, by one of two routes.

* ``upstream``: detectron2's GitHub source at a pinned commit, built with its compiled ops
  (``pip install --no-build-isolation git+https://github.com/...@<commit>``). Used when GitHub is
  reachable.
* ``pypi``: PyPI's ``pb1-detectron2==0.6`` source distribution, which lacks detectron2's C++ sources
  and predates NumPy 1.24 / Pillow 10. It is patched in a temporary copy before installation:
  the compiled ops are left out behind a ``detectron2/_C.py`` module that raises a clear error when a
  rotated-box / deformable-convolution / fast-COCO-eval op is called (none is used for semantic
  segmentation), and the removed aliases ``np.bool/np.int/np.float/np.str/np.object`` and
  ``PIL.Image.LINEAR/ANTIALIAS`` are replaced by their modern spellings.

The chosen route is printed. A second run finds the installation and returns at once.
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

SHIM_SOURCE = '''"""Stand-in for detectron2's compiled extension (written by tools/install_detectron2.py).

This detectron2 was installed from PyPI's pb1-detectron2 0.6 source distribution, which does not
contain the C++/CUDA sources. Semantic segmentation needs none of the compiled ops; calling one
raises a RuntimeError naming it. Install detectron2 from GitHub to get them.
"""

WITHOUT_COMPILED_OPS = True


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
        "(D2_INSTALL_ROUTE=upstream python tools/install_detectron2.py on a machine that reaches GitHub)."
    )
'''

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
    code = (
        "import detectron2, detectron2._C as c\n"
        f"print('pypi' if getattr(c, {SHIM_MARKER!r}, False) else 'upstream')\n"
    )
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return res.stdout.strip().splitlines()[-1]


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
    (root / "detectron2" / "_C.py").write_text(SHIM_SOURCE)
    return {"files": n_files, "replacements": n_repl}


def pip(python, *args):
    cmd = [python, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def install_upstream(python):
    pip(python, "install", "--no-build-isolation", "--no-deps",
        f"git+{UPSTREAM_REPO}@{UPSTREAM_COMMIT}")


def install_pypi(python):
    with tempfile.TemporaryDirectory(prefix="d2-pypi-") as tmp:
        tmp = Path(tmp)
        # pip < 25 still accepts the sdist's direct-URL extra when preparing its metadata.
        pip(python, "download", "--no-deps", "--no-build-isolation", "-d", str(tmp), PYPI_REQUIREMENT)
        archives = list(tmp.glob("pb1*detectron2-0.6.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one pb1-detectron2 sdist in {tmp}, found {archives}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6"
        summary = patch_source_tree(src)
        log(f"patched {summary['replacements']} removed NumPy/Pillow aliases in {summary['files']} files; "
            "compiled ops replaced by detectron2/_C.py stand-in")
        shutil.rmtree(src / "pb1_detectron2.egg-info", ignore_errors=True)
        pip(python, "install", "--no-build-isolation", "--no-deps", str(src))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = parser.parse_args(argv)

    forced = os.environ.get("D2_INSTALL_ROUTE") or None
    current = installed_route(args.python)
    if current and not args.force and (forced is None or forced == current):
        log(f"detectron2 already installed (route: {current}); nothing to do")
        return 0

    route = choose_route(forced, github_reachable)
    log(f"route: {route} " + ("(forced by D2_INSTALL_ROUTE)" if forced else
                              "(GitHub reachable)" if route == "upstream" else "(GitHub unreachable)"))
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

    got = installed_route(args.python)
    if got != route:
        raise SystemExit(f"detectron2 does not import after the {route} route (found {got})")
    log(f"detectron2 installed (route: {route})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
