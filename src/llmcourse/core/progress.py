"""Progress bars on stderr (tqdm), so ``--json`` output on stdout stays clean.

Bars show on a terminal and stay quiet in pipes and tests unless LLMCOURSE_PROGRESS=1.
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


def progress(iterable: Iterable | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr; ``desc`` and ``total`` as tqdm."""
    forced = os.environ.get("LLMCOURSE_PROGRESS")
    disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kw)


def _shown() -> bool:
    forced = os.environ.get("LLMCOURSE_PROGRESS")
    return (forced != "0") if forced is not None else sys.stderr.isatty()


@contextlib.contextmanager
def status(message: str, delay: float = 1.0) -> Iterator[None]:
    """Say ``message`` on stderr if the work inside takes longer than ``delay`` seconds (on a terminal,
    or with LLMCOURSE_PROGRESS=1), and how long it took when it ends."""
    if not _shown():
        yield
        return
    t0 = time.perf_counter()
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
