"""Options shared by every command, and the :class:`Result` a handler returns.

Labs call ``add_model_args`` / ``add_data_args`` / ``add_common_args`` so that
``--model``, ``--data``, ``--dtype``, ``--json``, ``--debug`` mean the same everywhere.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """What a command returns: ``data`` is printed for ``--json``, ``text`` otherwise."""

    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    exit_code: int = 0  # non-zero when the work ran but part of it failed (e.g. a tour section)


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its one-line error)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")


def add_model_args(p: argparse.ArgumentParser, name: str = "--model", default: str = "default",
                   help_prefix: str = "model") -> None:
    p.add_argument(
        name, default=default,
        help=f"{help_prefix}: 'default' (SmolLM2-135M-Instruct, offline), a local Hugging Face folder "
        "(safetensors), a llmcourse quantized folder, a .gguf file, or a Hub id (needs network). "
        "Default: %(default)s",
    )
    if name == "--model":
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default: fp32)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading pickle .bin/.pt checkpoints (can run arbitrary code: only for files you trust)")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a Hub/folder model to run its own Python code (off by default)")


def add_data_args(p: argparse.ArgumentParser, default_split: str = "eval") -> None:
    p.add_argument(
        "--data", default="default",
        help="text: 'default' (English Wikipedia extracts, offline) or a .txt, .jsonl, .csv or .parquet file. "
        "Default: %(default)s",
    )
    p.add_argument("--field", default=None,
                   help="column / JSON key holding the text in .jsonl/.csv/.parquet (default: 'text')")
    p.add_argument("--split", default=default_split, choices=["eval", "calibration", "train", "all"],
                   help="which split of the default data (ignored for files). Default: %(default)s")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`llmcourse.core.models.load_model` from parsed options."""
    return {
        "dtype": getattr(args, "dtype", "fp32"),
        "trust_pickle": getattr(args, "trust_pickle", False),
        "trust_remote_code": getattr(args, "trust_remote_code", False),
    }
