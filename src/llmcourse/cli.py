"""The one entry point: ``llmcourse <command>``.

The commands come from the lab table (:mod:`llmcourse.core.lab`): each lab declares its
commands with a one-line help, and a commands module whose ``register(sub, groups)`` builds
their parsers. ``sub`` is the top-level subparsers object; ``groups`` maps a group name
("eval", "convert", "quantize") to the subparsers of that group, so a lab can add e.g.
``convert gguf`` beside the core's ``convert hf``.

The parser is built lazily: every command is listed from the table, but only the lab of the
command being run is imported (so ``llmcourse --help`` imports no torch, and a lab whose optional
package is missing fails with one line only when its own command is used).

A command handler takes the parsed ``argparse.Namespace`` and returns a
:class:`llmcourse.core.cli_common.Result` (a JSON-able dict plus human text); this
module prints it (``--json``: one JSON object on stdout) and turns
:class:`~llmcourse.core.errors.UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from llmcourse import __version__
from llmcourse.core.cli_common import Result
from llmcourse.core.errors import UserError
from llmcourse.core.io import dumps, overwriting
from llmcourse.core.lab import HelpFormatter, import_lab_module
from llmcourse.core.threads import apply_threads, choose_threads
from llmcourse.labs import GROUPS, labs
from llmcourse.tour import TOUR


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (problem + where to look) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named on the command line ("generate", "quantize int8"), if any."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    if words[0] in GROUPS and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return words[0]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command listed, only the named command's lab imported.

    ``argv=None`` builds every lab's parsers (imports every lab; for tests and docs).
    """
    table = [*labs(), TOUR]
    chosen = _chosen(argv) if argv is not None else None
    parser = Parser(
        prog="llmcourse", formatter_class=HelpFormatter,
        description="The Large Language Model Course as a CPU library and CLI. "
        "Every command takes --help; --json prints one JSON object on stdout.",
        epilog="examples:\n  llmcourse tour --out tour\n  llmcourse generate --prompt \"I have a dream\"\n"
        "  llmcourse quantize gguf --model default --type Q4_K_M --out out/gguf\n  llmcourse generate --help",
    )
    parser.add_argument("--version", action="version", version=f"llmcourse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, help_text in GROUPS.items():
        kinds = [c.split(" ", 1)[1] for lab in table for c in lab.commands if c.startswith(name + " ")]
        text = f"{help_text} ({', '.join(kinds)})"
        gp = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        groups[name] = gp.add_subparsers(dest="subcommand", metavar="KIND")
        gp.set_defaults(_group_parser=gp)
    for lab in table:
        if argv is None or chosen in lab.commands:
            import_lab_module(lab, lab.commands_module).register(sub, groups)
            _add_overwrite(sub)
            continue
        for command, help_text in lab.commands.items():  # listed, not built: never parsed in this run
            group, _, kind = command.partition(" ")
            (groups[group] if kind else sub).add_parser(kind or group, help=help_text)
    return parser


def _add_overwrite(sub: argparse._SubParsersAction) -> None:
    """Every command with an ``--out`` gets ``--overwrite`` (outputs are never replaced without it)."""
    for p in {id(c): c for c in sub.choices.values()}.values():
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                _add_overwrite(a)
        dests = {a.dest for a in p._actions}
        if "out" in dests and "overwrite" not in dests:
            p.add_argument("--overwrite", action="store_true",
                           help="replace an existing --out (a folder only if llmcourse wrote it)")


def _quiet_libraries(debug: bool) -> None:
    """Keep third-party chatter (transformers' load bars and warnings) off the user's terminal."""
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
    """Run one command; every way it can end is one of: its output (exit 0, or the result's code), one
    ``llmcourse: error: ...`` line (exit 2), ``llmcourse: interrupted`` (Ctrl-C, exit 130, at any moment,
    start-up included), or a quiet exit 141 when stdout is closed early (``llmcourse generate ... | head -c 1``)."""
    previous = _watch_interrupts()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _say("llmcourse: interrupted")
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except Exception:
        # a Ctrl-C that landed inside an import can resurface as another error (numpy turns it into
        # "ImportError: cannot load module more than once"): after a Ctrl-C, any failure is the interruption
        if _INTERRUPTED.is_set():
            _say("llmcourse: interrupted")
            return 130
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


_INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _watch_interrupts() -> Any:
    """Note every Ctrl-C (then raise KeyboardInterrupt as Python's own handler does); return the handler to
    restore, or None where Python's default one is not installed (Ctrl-C ignored, another handler, a thread)."""
    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _on_sigint)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr itself is gone: nothing left to tell
        pass


def _closed_stdout() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as a process killed by SIGPIPE would
    (exit 128 + 13), and keep Python from reporting the broken pipe again when it flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except UserError as e:  # a lab's optional package is missing
        _say(f"llmcourse: error: {e}")
        return UserError.exit_code
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(debug)
    handler = getattr(args, "func", None)
    if handler is None:
        gp = getattr(args, "_group_parser", None)
        (gp or parser).print_help()
        return 2 if argv else 0
    try:
        out = getattr(args, "out", None)
        if isinstance(out, str) and not out.strip():  # Path("") is "." (the current folder): never meant
            raise UserError("--out is empty", "pass a file or folder path")
        threads = None
        if hasattr(args, "threads"):  # commands that compute: choose before torch starts its pool
            threads = choose_threads(args.threads)
            apply_threads(threads)
        with overwriting(getattr(args, "overwrite", False)):
            result = handler(args)
        if isinstance(result, Result) and threads is not None:
            result.data.setdefault("threads", threads)
    except UserError as e:
        if _INTERRUPTED.is_set():  # the error is the Ctrl-C's doing (a half-finished import, say)
            raise KeyboardInterrupt from None
        if debug:
            raise
        _say(f"llmcourse: error: {e}")
        return UserError.exit_code
    if isinstance(result, Result):
        if getattr(args, "json", False):
            print(dumps(result.data))
        elif result.text:
            print(result.text)
        sys.stdout.flush()  # a closed pipe is reported here, inside main, not at interpreter exit
        if result.error:
            _say(f"llmcourse: error: {result.error}")
        return result.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
