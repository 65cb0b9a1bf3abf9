"""Progress on stderr, so ``--json`` output on stdout stays clean.

On a terminal: tqdm bars. Elsewhere (a pipe, a log file, CI): a line per phase once the phase has run
``delay`` seconds — ``perplexity: 0/4095 tok…``, then a line every ``every`` seconds while it runs and
``perplexity: done, 4095/4095 tok in 38.2 s`` when it ends — so a long command is never silent, and short
ones (tests on tiny models) print nothing. ``LLMCOURSE_PROGRESS=1`` forces tqdm bars, ``=0`` silences both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

DELAY = 2.0  # seconds a phase runs before a non-terminal hears of it
EVERY = 30.0  # seconds between a running phase's lines on a non-terminal


def _mode() -> str:
    """'bar' (tqdm), 'lines' (a line per phase) or 'off'."""
    forced = os.environ.get("LLMCOURSE_PROGRESS")
    if forced == "0":
        return "off"
    if forced == "1" or sys.stderr.isatty():
        return "bar"
    return "lines"


class PhaseLines:
    """The non-terminal stand-in for a tqdm bar (the part of its API the labs use: ``update``,
    ``set_postfix``, ``close``, iteration, ``with``): whole lines on stderr, see the module docstring."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: float | None = None,
                 unit: str = "it", initial: float = 0, delay: float | None = None, every: float | None = None,
                 **_ignored: Any) -> None:
        delay = DELAY if delay is None else delay
        every = EVERY if every is None else every
        self.iterable, self.desc, self.unit, self.every = iterable, desc or "working", unit, every
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, initial, ""
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.shown = False
        self.closed = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay, self._say)
        self._timer.daemon = True
        self._timer.start()

    def _count(self) -> str:
        if self.total is None and not self.unit:  # a phase without a count
            return ""
        n = f"{self.n:g}" if isinstance(self.n, float) else str(self.n)
        return f" {n}/{self.total:g} {self.unit}" if self.total is not None else f" {n} {self.unit}"

    def _line(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _say(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.shown, self.last = True, time.perf_counter()
            count = self._count()
            self._line(f"{self.desc}{':' + count if count else ''}{self.postfix}…")

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.shown and time.perf_counter() - self.last >= self.every:
            self._say()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = (" (" + ", ".join(f"{k}={v}" for k, v in items.items()) + ")") if items else ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._timer.cancel()
            if self.shown:
                count = self._count()
                self._line(f"{self.desc}: done{',' + count if count else ''}{self.postfix} in "
                           f"{time.perf_counter() - self.t0:.1f} s")

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "PhaseLines was given no iterable"
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PhaseLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, **kw: Any) -> Any:
    """A tqdm bar on a terminal, :class:`PhaseLines` elsewhere (``desc``, ``total``, ``unit`` as tqdm)."""
    mode = _mode()
    if mode == "lines":
        return PhaseLines(iterable, **kw)
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, disable=mode == "off", **kw)


@contextlib.contextmanager
def status(message: str, delay: float = 1.0) -> Iterator[None]:
    """Say ``message`` on stderr if the work inside takes longer than ``delay`` seconds, and how long it
    took when it ends. On a terminal the message shows while the work runs; elsewhere it is one line
    written when the work succeeds (a failure's error message stays the only line)."""
    mode = _mode()
    if mode == "off":
        yield
        return
    t0 = time.perf_counter()
    if mode == "lines":
        yield
        took = time.perf_counter() - t0
        if took > delay:
            sys.stderr.write(f"{message} {took:.1f} s\n")
            sys.stderr.flush()
        return
    said = threading.Event()

    def say() -> None:
        said.set()
        sys.stderr.write(message)
        sys.stderr.flush()

    timer = threading.Timer(delay, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            sys.stderr.write(f" {time.perf_counter() - t0:.1f} s\n")
            sys.stderr.flush()


def phase(desc: str, delay: float | None = None) -> PhaseLines | Any:
    """A phase without a count (saving, evaluating): a tqdm-free line on a non-terminal, a status line on
    a terminal. Use as ``with phase("saving"): ...``."""
    mode = _mode()
    if mode == "lines":
        return PhaseLines(desc=desc, total=None, unit="", delay=delay)
    if mode == "off":
        return contextlib.nullcontext()
    return status(f"{desc}…", delay=DELAY if delay is None else delay)


@contextlib.contextmanager
def stage(bar: Any, name: str) -> Iterator[None]:
    """Show that ``bar``'s phase is busy with ``name`` (evaluating, saving) while the work inside runs: the
    bar's description on a terminal (``finetune (evaluating)``), a phase of its own elsewhere."""
    if bar is None or _mode() == "off":
        yield
        return
    if isinstance(bar, PhaseLines):
        with PhaseLines(desc=f"{bar.desc}: {name}", unit=""):
            yield
        return
    old = bar.desc
    bar.set_description(f"{old} ({name})")
    try:
        yield
    finally:
        bar.set_description(old)


def announce(text: str) -> None:
    """One line on stderr (a long run's step: "tour 3/9: 8-bit quantization…"), on a terminal or not, unless
    LLMCOURSE_PROGRESS=0. Call it between bars, not while one is drawn."""
    if _mode() != "off":
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
