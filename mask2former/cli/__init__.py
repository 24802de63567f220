"""Command-line tools: one module per command, each with ``main(argv=None) -> int``.

They are installed as console commands (``m2f-predict``, ``m2f-train``, ... see pyproject.toml),
run as ``python -m mask2former.cli.<module>``, and the scripts in ``tools/`` and ``datasets/`` are
one-line wrappers over them. Nothing is imported here.
"""
