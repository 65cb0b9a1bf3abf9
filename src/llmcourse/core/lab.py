"""What a lab declares (:class:`Lab`) and the helpers the CLI, the tour and ``load_model`` use with it.

Each lab package declares one :class:`Lab` named ``LAB`` in its ``__init__`` (kept light: no torch,
no optional packages at import time). The table of labs is ``llmcourse/labs.py``, outside core:
core never names a lab. The table registers each lab's folder formats here
(:func:`register_formats`) when the ``llmcourse`` package is imported, and
:func:`llmcourse.core.models.load_model` looks them up with :func:`folder_loader`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmcourse.core.errors import UserError


@dataclass(frozen=True)
class Lab:
    """What a lab contributes, declared in its package's ``__init__``.

    ``commands`` maps each command (``"generate"``, or ``"quantize int8"`` inside a group) to its
    one-line help; ``commands_module`` has ``register(sub, groups)`` that builds their parsers (it is
    imported only when one of them is used). ``tour`` is ``"module:function"`` of the tour section,
    ``formats`` maps a ``llmcourse.json`` format name to ``"module:function"`` of its loader
    ``(path, dtype) -> LoadedModel``, ``file_formats`` maps the first bytes of a model file (its magic,
    e.g. ``b"GGUF"``: the file's own metadata, not its name) to a loader of the same signature, and
    ``requires`` maps the optional packages (import names) the lab needs to the command that installs them.
    """

    name: str
    title: str
    commands: dict[str, str] = field(default_factory=dict)
    commands_module: str | None = None
    tour: str | None = None
    formats: dict[str, str] = field(default_factory=dict)
    requires: dict[str, str] = field(default_factory=dict)
    file_formats: dict[bytes, str] = field(default_factory=dict)  # a file's magic bytes -> "module:loader"
    docs: str | None = None  # the lab's page, e.g. "docs/decoding.md" (the tour links to it)
    # one example command line per command of a group ("quantize gptq" -> "llmcourse quantize gptq ..."),
    # shown on the group's page (`llmcourse quantize --help`), which is built without importing the lab
    examples: dict[str, str] = field(default_factory=dict)


def missing_dependency(lab: Lab, exc: ModuleNotFoundError) -> UserError:
    """The one-line error for a lab whose optional package is not installed."""
    name = (exc.name or "").split(".")[0]
    hint = lab.requires.get(name) or f"pip install {name}"
    return UserError(f"the {lab.name} lab needs the package {name!r}, which is not installed", f"run `{hint}`")


def import_lab_module(lab: Lab, module: str) -> Any:
    """Import one of ``lab``'s modules; a missing third-party package becomes a one-line UserError."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("llmcourse"):
            raise missing_dependency(lab, e) from e
        raise


_FORMATS: dict[str, tuple[Lab, str]] = {}  # llmcourse.json format -> (lab, "module:function")


_FILE_FORMATS: dict[bytes, tuple[Lab, str]] = {}  # magic bytes -> (lab, "module:function")


_GROUP_EXAMPLES: dict[str, list[str]] = {}  # group ("quantize") -> the example lines its labs declared


def register_formats(lab: Lab) -> None:
    """Make ``lab``'s folder and file formats loadable, and its group commands' examples known to the
    group pages (done by the lab table)."""
    for fmt, ref in lab.formats.items():
        _FORMATS[fmt] = (lab, ref)
    for magic, ref in lab.file_formats.items():
        _FILE_FORMATS[magic] = (lab, ref)
    for command, example in lab.examples.items():
        group, _, kind = command.partition(" ")
        if kind and example not in _GROUP_EXAMPLES.get(group, []):
            _GROUP_EXAMPLES.setdefault(group, []).append(example)


def file_loader(head: bytes) -> Callable[..., Any] | None:
    """The loader a lab registered for a model file starting with ``head``, or None."""
    for magic, (lab, ref) in _FILE_FORMATS.items():
        if head.startswith(magic):
            mod_name, _, fn = ref.partition(":")
            return getattr(import_lab_module(lab, mod_name), fn)
    return None


def folder_loader(fmt: str) -> Callable[..., Any]:
    """The loader ``(path, dtype) -> LoadedModel`` of a ``llmcourse.json`` folder format."""
    if fmt not in _FORMATS:
        raise UserError(f"unknown llmcourse folder format {fmt!r}", f"known formats: {', '.join(sorted(_FORMATS))}; "
                        "re-create the folder with this version of llmcourse")
    lab, ref = _FORMATS[fmt]
    mod_name, _, fn = ref.partition(":")
    return getattr(import_lab_module(lab, mod_name), fn)


def add_parser(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction], lab: Lab,
               command: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """Add ``command``'s parser (top level, or in its group) with the help declared in ``lab``.

    ``epilog`` holds examples; it is shown verbatim after the options in ``--help``.
    """
    group, _, kind = command.partition(" ")
    target, name = (groups[group], kind) if kind else (sub, group)
    p = target.add_parser(name, help=lab.commands[command], description=description, epilog=epilog,
                          formatter_class=HelpFormatter)
    p.__class__ = _strict(type(p))  # its sub-actions (`kg ask`) inherit the class
    return p


def _strict(cls: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    """``cls`` whose parsers refuse unknown arguments themselves, so the error names this command's
    ``--help`` rather than the top-level one (argparse leaves extras to the outermost parser)."""
    if issubclass(cls, _StrictMixin):
        return cls
    return type(f"Strict{cls.__name__}", (_StrictMixin, cls), {})


class _StrictMixin(argparse.ArgumentParser):
    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus: every option's help ends with its default (unless it already
    names one), and indented lines of a description or epilog (examples) are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower() or action.default in (None, False, [])
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"

    def format_help(self) -> str:
        """The help, plus examples on a group's page (``llmcourse quantize --help``), from the labs' declarations."""
        text = super().format_help()
        words = self._prog.split()
        examples = _GROUP_EXAMPLES.get(words[-1], []) if len(words) == 2 else []
        if examples and "examples:" not in text and ("options:" in text or "positional arguments:" in text):
            lines = [f"  {e}" for e in examples] + [f"  {' '.join(words)} KIND --help      # a kind's options and examples"]
            text = text.rstrip("\n") + "\n\nexamples:\n" + "\n".join(lines) + "\n"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            if para.startswith((" ", "\n")) or "\n " in para:
                out.append("\n".join(indent + line for line in para.splitlines()))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def lazy_exports(package: str, public: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """A lab package's public names, imported on first use (PEP 562), so declaring the lab stays cheap.

    ``public`` maps a submodule to the names it provides; returns the package's ``__getattr__`` and
    the names for ``__all__``::

        __getattr__, _names = lazy_exports(__name__, {"engine": ("generate", "GenerationConfig")})
    """
    where = {name: mod for mod, names in public.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(where)
