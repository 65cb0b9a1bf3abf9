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
    error: str = ""  # with a non-zero exit_code: why, printed as one ``llmcourse: error:`` line on stderr


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
    p.add_argument("--threads", type=positive_int, default=None,
                   help="compute threads (default: $LLMCOURSE_THREADS, else the cores idle at start, so that a "
                   "busy core does not stall every step)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")


def add_model_args(p: argparse.ArgumentParser, name: str = "--model", default: str = "default",
                   help_prefix: str = "model") -> None:
    p.add_argument(
        name, default=default,
        help=f"{help_prefix}: 'default' (SmolLM2-135M-Instruct, offline), 'gemma3' (Gemma 3 270M, offline), "
        "a local Hugging Face folder "
        "(safetensors), a llmcourse quantized folder, a .gguf file, or a Hub id (needs network). "
        "Default: %(default)s",
    )
    if name == "--model":
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default: fp32)")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading pickle .bin/.pt checkpoints (can run arbitrary code: only for files you trust)")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a Hub/folder model to run its own Python code (off by default)")


def add_chat_template_args(p: argparse.ArgumentParser) -> None:
    """``--chat-template FILE|none`` for the commands that build chat prompts (rendered by
    :mod:`llmcourse.core.chat_template`, in a sandbox with limits)."""
    p.add_argument("--chat-template", default=None, metavar="FILE|none",
                   help="render chats with this Jinja template instead of the model's own, or 'none' for a plain "
                   "'role: text' transcript (default: the model's template)")


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


# --- options declared once: CLI flags generated from a config dataclass -------------------------

def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field that is also a CLI option: ``help`` is its ``--help`` text; ``cli`` may set
    ``flag`` (default ``--field-name``), ``choices``, ``type``, ``metavar``, ``action`` ("append"
    for a tuple of strings). The default lives here only; the CLI shows it."""
    if isinstance(default, (list, dict, set)):  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def _field_type(f: Any) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def _as_argparse_type(fn: Any) -> Any:
    """A parse function whose UserError becomes argparse's one-line error (exit 2)."""
    from llmcourse.core.errors import UserError

    def parse(text: str) -> Any:
        try:
            return fn(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def add_config_args(p: Any, cls: type, defaults: dict[str, Any] | None = None,
                    exclude: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass ``cls`` that carries ``help`` metadata (see :func:`option`).

    ``defaults`` overrides a field's default for this command (e.g. ``chat`` generates 256 tokens)."""
    import dataclasses

    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or f.name in exclude:
            continue
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"dest": f.name, "help": meta.pop("help")}
        own = (f.default if f.default is not dataclasses.MISSING
               else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        default = defaults.get(f.name, own)
        action = meta.pop("action", None)
        if action == "append":
            kw.update(action="append", default=list(default or []))
        elif isinstance(default, bool) and "type" not in meta:
            kw.update(action="store_true" if not default else "store_false", default=default)
        else:
            kw.update(type=_as_argparse_type(meta.pop("type", _field_type(f))), default=default)
        kw.update(meta)
        p.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed options that :func:`add_config_args` added (plus ``extra``)."""
    import dataclasses

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata
          and hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        if f.metadata.get("action") == "append" and f.name in kw:
            kw[f.name] = tuple(kw[f.name] or ())
    kw.update(extra)
    return cls(**kw)
