"""Chat templates rendered in a Jinja sandbox with limits: the one place a chat prompt is built.

A model's chat template (``chat_template.jinja``, ``tokenizer_config.json``'s ``chat_template``, a GGUF's
``tokenizer.chat_template``) is code from the checkpoint. transformers renders it in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute escapes), but without limits: a 70 MB template, two nested
``range(100000)`` loops or a string bomb (``"x" * 10**10``) hang or exhaust memory, and every Jinja error is
a traceback. Here the same environment as ``transformers.utils.chat_template_utils`` (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``, ``strftime_now``, ``namespace``,
``dict``, ``{% generation %}``) renders it with:

* a size cap on the template (:data:`MAX_TEMPLATE_CHARS`), checked before it is compiled;
* a time budget (:data:`RENDER_SECONDS`): a trace function counts the lines the compiled template runs
  (every loop iteration is one; only the template's own frames are traced) and stops it at the deadline;
  no thread is started;
* an output budget (:data:`MAX_OUTPUT_CHARS` plus four times the messages' text): the output is counted
  chunk by chunk, and every operation that can build a large string or list in one step (``*``, ``**``,
  ``+``, ``%``, ``~``, the filters, the methods of strings) is checked *before* it runs;
* every failure (syntax, undefined, security, ``include``/``import``, ``raise_exception``, recursion, memory,
  the budgets) turned into one :class:`UserError` line that names the file and key the template came from.

The rendered text is then tokenized without adding special tokens, as ``apply_chat_template`` does, so the
ids equal transformers' for any template that renders (tested on the default model's).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from llmcourse.core.errors import UserError

MAX_TEMPLATE_CHARS = 256 * 1024  # real templates are under 30 kB; tool-use ones included
MAX_OUTPUT_CHARS = 1_000_000  # plus 4x the messages' own text
RENDER_SECONDS = 5.0
MAX_INT_ARG = 1_000_000  # a width, count or indent above this in a filter or string method is refused
TEMPLATE_FILENAME = "<llmcourse chat template>"

# what the CLI's --chat-template sets on a tokenizer: the template's origin (for messages) and "plain" (none)
ORIGIN_ATTR = "llmcourse_chat_template_origin"
PLAIN_ATTR = "llmcourse_plain_chat"


class TemplateBudget(Exception):
    """The template ran past its time or output budget (turned into a UserError by :func:`render_chat`)."""


def _fix() -> str:
    return "fix the template, or pass --chat-template FILE (a Jinja template) or --chat-template none"


# --- the bounded environment ------------------------------------------------------------------------------

def _digit_run(fmt: Any) -> bool:
    """A format string with a width or precision of 7+ digits (``"%9999999d"``, ``"{:>9999999}"``)."""
    return isinstance(fmt, str) and re.search(r"\d{7,}", fmt) is not None


def _length(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple, dict)) else 0


def _check_args(limit: int, name: str, args: tuple, kwargs: dict) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > min(limit, MAX_INT_ARG):
            raise TemplateBudget(f"{name}() with the argument {v} would build too large a string")


def _check_replace(limit: int, s: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        if len(s) + n * (len(new) - len(old)) > limit:
            raise TemplateBudget("replace() would build too large a string")


def _bounded_filter(env: Any, name: str, fn: Callable) -> Callable:
    """``fn`` with its integer arguments and its result checked against the output budget."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        limit = env.output_limit
        values = [a for a in args if not _is_jinja_context(a)]
        _check_args(limit, name, tuple(values[1:]), kwargs)
        if name == "replace" and len(values) >= 3:
            _check_replace(limit, *values[:4])
        if name == "format" and values and _digit_run(values[0]):
            raise TemplateBudget("format() with a 7-digit width would build too large a string")
        out = fn(*args, **kwargs)
        if _length(out) > limit:
            raise TemplateBudget(f"{name}() built a string of {_length(out):,} characters")
        return out

    return wrapper


def _is_jinja_context(x: Any) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    return isinstance(x, (Context, EvalContext)) or type(x).__name__ == "Environment" or hasattr(x, "sandboxed")


@functools.lru_cache(maxsize=1)
def _environment_class() -> type:
    """The sandbox with limits (built on first use: jinja2 is imported only when a template is rendered)."""
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # ``a ~ b``: checked before it is joined
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset(["*", "**", "+", "%"])
        output_limit = MAX_OUTPUT_CHARS

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
            self.filters["tojson"] = _tojson
            self.filters = {k: _bounded_filter(self, k, f) for k, f in self.filters.items()}
            self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                                dict=_TemplateDict(), namespace=_namespace_class())

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            limit = self.output_limit
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > limit:
                        raise TemplateBudget(f"a repetition of {len(seq) * n:,} items")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                        max(1, abs(left).bit_length()) * right > 64 * limit:
                    raise TemplateBudget("a power too large to compute")
            elif operator == "+":
                if _length(left) + _length(right) > limit:
                    raise TemplateBudget(f"a sum of {_length(left) + _length(right):,} items")
            elif operator == "%" and _digit_run(left):
                raise TemplateBudget("a %-format with a 7-digit width")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            limit = __self.output_limit
            name = getattr(__obj, "__name__", "call")
            if getattr(__obj, "__self__", None) is not None and isinstance(__obj.__self__, (str, list, dict)):
                _check_args(limit, name, args, kwargs)
                if name == "replace":
                    _check_replace(limit, __obj.__self__, *args[:3])
                if name in ("format", "format_map") and _digit_run(__obj.__self__):
                    raise TemplateBudget("format() with a 7-digit width")
            out = super().call(__context, __obj, *args, **kwargs)
            if _length(out) > limit:
                raise TemplateBudget(f"{name}() built {_length(out):,} items")
            return out

        def bounded_concat(self, parts: tuple) -> str:
            texts = [str(p) for p in parts]
            if sum(map(len, texts)) > self.output_limit:
                raise TemplateBudget(f"a ~ concatenation of {sum(map(len, texts)):,} characters")
            return "".join(texts)

    return Env


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, its options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates without the type itself (no ``dict.__class__`` tricks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _namespace_class() -> type:
    from jinja2.exceptions import SecurityError
    from jinja2.utils import Namespace

    class TemplateNamespace(Namespace):
        """A namespace that refuses underscore attributes (as transformers')."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    return TemplateNamespace


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    env = _environment_class()()
    code = env.compile(source, filename=TEMPLATE_FILENAME)
    return env.template_class.from_code(env, code, env.make_globals(None))


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Trace the template's own frames: every line it runs (each loop iteration included) is counted, and
    the clock is read every 256 lines; past ``seconds`` the template is stopped with :class:`TemplateBudget`."""
    end = time.monotonic() + seconds
    lines = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if not lines & 255 and time.monotonic() > end:
                raise TemplateBudget(f"it ran for more than {seconds:g} s")
        return local

    def call(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == TEMPLATE_FILENAME:
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_chat(template: str, origin: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                variables: dict[str, Any] | None = None, seconds: float = RENDER_SECONDS) -> str:
    """Render ``template`` (from ``origin``, e.g. ``"model/chat_template.jinja"``) for ``messages`` within the
    limits above; any failure is one :class:`UserError` line naming ``origin``."""
    if not isinstance(template, str):
        raise UserError(f"the chat template in {origin} is not text ({type(template).__name__})", _fix())
    if len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"the chat template in {origin} has {len(template):,} characters, over the limit of "
                        f"{MAX_TEMPLATE_CHARS:,}", _fix())
    text_in = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    limit = MAX_OUTPUT_CHARS + 4 * text_in
    out: list[str] = []
    size = 0
    try:
        with _deadline(seconds):
            compiled = _compile(template)
            compiled.environment.output_limit = limit
            for chunk in compiled.generate(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **(variables or {})):
                size += len(chunk)
                if size > limit:
                    raise TemplateBudget(f"its output passed {limit:,} characters")
                out.append(chunk)
    except TemplateBudget as e:
        raise UserError(f"the chat template in {origin} was stopped: {e}", _fix()) from None
    except RecursionError:
        raise UserError(f"the chat template in {origin} recursed too deeply", _fix()) from None
    except MemoryError:
        raise UserError(f"the chat template in {origin} ran out of memory", _fix()) from None
    except Exception as e:  # untrusted code from the checkpoint: every failure is bad input, on one line
        raise UserError(f"the chat template in {origin} cannot be rendered ({_describe(e)})", _fix()) from None
    return "".join(out)


def _describe(e: Exception) -> str:
    kind = type(e).__name__
    if kind == "TypeError" and "no loader" in str(e):
        return "include/import/extends of another template is not allowed"
    line = getattr(e, "lineno", None)
    msg = " ".join(str(e).split())[:160]
    return f"{kind}{f' at line {line}' if line else ''}: {msg}" if msg else kind


# --- where a tokenizer's template comes from, and the --chat-template override ----------------------------

def template_origin(tokenizer: Any) -> str:
    """The file (and key) the tokenizer's chat template was read from, for messages."""
    origin = getattr(tokenizer, ORIGIN_ATTR, None)
    if origin:
        return str(origin)
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if str(folder) not in ("", ".") and folder.is_dir():
        if (folder / "chat_template.jinja").is_file():
            return str(folder / "chat_template.jinja")
        return f"{folder / 'tokenizer_config.json'} (key chat_template)"
    return "the model's tokenizer (key chat_template)"


def read_template_file(value: str) -> str:
    """The text of ``--chat-template FILE`` (a regular UTF-8 file under the size cap)."""
    from llmcourse.core.io import expand_path

    path = expand_path(value)
    try:
        if not path.is_file():
            raise UserError(f"--chat-template {value} is not a file", "pass a Jinja template file, or none")
        if path.stat().st_size > 4 * MAX_TEMPLATE_CHARS:
            raise UserError(f"--chat-template {value} is over {MAX_TEMPLATE_CHARS:,} characters",
                            "pass a smaller template")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--chat-template {value} is not UTF-8 text", "pass a Jinja template file") from None
    except OSError as e:
        raise UserError(f"cannot read --chat-template {value} ({e.strerror or type(e).__name__})",
                        "pass a readable template file") from None


def set_chat_template(tokenizer: Any, value: str | None) -> None:
    """Apply ``--chat-template``: ``None`` keeps the model's, ``"none"`` uses a plain transcript
    (``role: text`` lines), anything else is a template file read now (refused at once if it does not compile)."""
    if value is None:
        return
    if value.strip().lower() == "none":
        tokenizer.chat_template = None
        setattr(tokenizer, PLAIN_ATTR, True)
        return
    text = read_template_file(value)
    tokenizer.chat_template = text
    setattr(tokenizer, ORIGIN_ATTR, value)
    setattr(tokenizer, PLAIN_ATTR, False)
    render_chat(text, value, [{"role": "user", "content": "hi"}])  # a broken file fails before the model runs


def plain_transcript(messages: list[dict[str, Any]]) -> str:
    """``--chat-template none``: the turns as ``role: text`` lines, ending with ``assistant:``."""
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


def chat_text(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str | None:
    """The prompt text of ``messages``: the tokenizer's template rendered with limits, the plain transcript
    for ``--chat-template none``, or None when the model has no template (the caller decides)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, as transformers picks without tools
        template = template.get("default", next(iter(template.values()), None))
    if not template:
        return plain_transcript(messages) if getattr(tokenizer, PLAIN_ATTR, False) else None
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
               if isinstance(v, str)}
    return render_chat(template, template_origin(tokenizer), messages, add_generation_prompt=add_generation_prompt,
                       variables=special)


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int] | None:
    """Token ids of :func:`chat_text` (tokenized without adding special tokens, as ``apply_chat_template``)."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    if text is None:
        return None
    return list(tokenizer(text, add_special_tokens=False).input_ids)
