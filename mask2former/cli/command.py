"""What the command-line tools share: their argument parser, the config arguments, the project
configuration built from them (the core keys with the SeMask and DiNAT extensions) and the
console-command entry point."""

import argparse
import logging
from typing import Any, Callable, Optional, Sequence

from dinat import add_dinat_config
from mask2former.engine import build_cfg
from semask import add_semask_config

__all__ = [
    "EXTENSION_CONFIGS",
    "add_config_file_argument",
    "add_overrides_argument",
    "console_entry",
    "project_cfg",
    "tool_parser",
]

# The extensions whose ``add_*_config`` every tool applies after the core's: any tool reads any
# model family's config file.
EXTENSION_CONFIGS = (add_semask_config, add_dinat_config)


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is the tool module's docstring, line breaks kept."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_file_argument(
    parser: argparse.ArgumentParser, *, required: bool = True, help: Optional[str] = None
) -> None:
    """``--config-file``: required, or (``required=False``) empty by default."""
    if required:
        parser.add_argument("--config-file", required=True, help=help)
    else:
        parser.add_argument("--config-file", default="", help=help)


def add_overrides_argument(
    parser: argparse.ArgumentParser, help: str = "config overrides KEY VALUE ..."
) -> None:
    """The trailing ``KEY VALUE ...`` config overrides, as ``args.opts``."""
    parser.add_argument("opts", nargs=argparse.REMAINDER, help=help)


def project_cfg(args: argparse.Namespace):
    """The frozen project config of ``args.config_file`` with ``args.opts`` applied."""
    return build_cfg(args.config_file, args.opts, EXTENSION_CONFIGS)


def console_entry(
    main: Callable[[Optional[Sequence[str]]], Any], *, log_info: bool = False
) -> Callable[[Optional[Sequence[str]]], int]:
    """The console command of a tool's ``main(argv)``: errors raise, success exits with 0.
    ``log_info`` shows the INFO records of loggers that have no handler of their own."""

    def console_main(argv: Optional[Sequence[str]] = None) -> int:
        if log_info:
            logging.basicConfig(level=logging.INFO)
        main(argv)
        return 0

    console_main.__doc__ = f"{main.__module__}.main on the command line; exit status 0."
    return console_main
