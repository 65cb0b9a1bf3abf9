"""The one entry point: ``llmcourse <command>``.

Each lab contributes its commands through a ``register(sub, groups)`` function in its
``commands`` module (listed in :data:`COMMAND_MODULES`). ``sub`` is the top-level
subparsers object; ``groups`` maps a group name ("convert", "quantize", "eval") to the
subparsers of that group so a lab can add e.g. ``convert gguf`` beside the core's
``convert hf``.

A command handler takes the parsed ``argparse.Namespace`` and returns a
:class:`llmcourse.core.cli_common.Result` (a JSON-able dict plus human text); this
module prints it (``--json``: one JSON object on stdout) and turns
:class:`~llmcourse.core.errors.UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from llmcourse import __version__
from llmcourse.core.cli_common import Result
from llmcourse.core.errors import UserError
from llmcourse.core.io import dumps

# Order here is the order in `llmcourse --help`.
COMMAND_MODULES = [
    "llmcourse.core.commands",
    "llmcourse.decoding.commands",
    "llmcourse.quant.int8_commands",
    "llmcourse.quant.gguf.commands",
    "llmcourse.tour",
]

GROUPS = {
    "convert": "convert a model between formats (hf, gguf)",
    "quantize": "quantize a model (int8, gguf)",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (problem + where to look) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llmcourse",
        description="The Large Language Model Course as a CPU library and CLI. "
        "Every command takes --help; --json prints one JSON object on stdout.",
    )
    parser.add_argument("--version", action="version", version=f"llmcourse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, help_text in GROUPS.items():
        gp = sub.add_parser(name, help=help_text, description=help_text)
        groups[name] = gp.add_subparsers(dest="subcommand", metavar="KIND")
        gp.set_defaults(_group_parser=gp)
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # lab not present in this build
            raise
        mod.register(sub, groups)
    return parser


def _quiet_libraries(debug: bool) -> None:
    """Keep third-party chatter (transformers' load bars and warnings) off the user's terminal."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if debug:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():  # on a terminal, keep transformers' bars for long loads
            hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(debug)
    handler = getattr(args, "func", None)
    if handler is None:
        gp = getattr(args, "_group_parser", None)
        (gp or parser).print_help()
        return 2 if argv or len(sys.argv) > 1 else 0
    try:
        result = handler(args)
    except UserError as e:
        if debug:
            raise
        print(f"llmcourse: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("llmcourse: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, Result):
        if getattr(args, "json", False):
            print(dumps(result.data))
        elif result.text:
            print(result.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
