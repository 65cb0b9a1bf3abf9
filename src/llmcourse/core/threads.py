"""How many threads to compute with: ``--threads``, ``LLMCOURSE_THREADS``, or the cores that are idle now.

A thread count equal to the core count collapses when another program keeps a core busy: every
parallel region (hundreds per decoded token) waits for the thread that is not scheduled, and
decoding fell from 37 to 1.3 tokens/s here (shared/MACHINE.md). So the default counts the cores
that are idle when the command starts — sampled from ``/proc/stat`` over a tenth of a second —
and uses those (at least one). ``torch.set_num_threads`` applies it to torch's kernels and to the
compiled decode step (TorchInductor's C++ kernels take torch's thread count when they compile).
"""

from __future__ import annotations

import logging
import os
import time

from llmcourse.core.errors import UserError

log = logging.getLogger(__name__)
ENV = "LLMCOURSE_THREADS"


def _cpu_times() -> list[tuple[int, int]] | None:
    """(busy, total) jiffies per core from /proc/stat, or None where it is not readable."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    out = []
    for r in rows:
        v = [int(x) for x in r[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        out.append((sum(v) - idle, sum(v)))
    return out


def idle_cores(interval: float = 0.1) -> int | None:
    """Cores that were mostly idle (< 50% busy) during ``interval`` seconds, or None if unknown."""
    a = _cpu_times()
    if not a:
        return None
    time.sleep(interval)
    b = _cpu_times()
    if not b or len(b) != len(a):
        return None
    idle = 0
    for (busy0, tot0), (busy1, tot1) in zip(a, b, strict=True):
        dt = tot1 - tot0
        if dt <= 0 or (busy1 - busy0) / dt < 0.5:
            idle += 1
    return idle


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None) -> int:
    """The thread count: ``requested`` (``--threads``), else ``$LLMCOURSE_THREADS``, else the idle cores."""
    cores = available_cores()
    if requested is None:
        env = os.environ.get(ENV, "").strip()
        if env:
            try:
                requested = int(env)
            except ValueError:
                raise UserError(f"{ENV}={env!r} is not an integer", f"set {ENV} to a thread count, e.g. 2") from None
            if requested < 1:
                raise UserError(f"{ENV}={env} must be >= 1", f"set {ENV} to a thread count, e.g. 2")
    if requested is not None:
        return requested
    idle = idle_cores()
    n = cores if idle is None else max(1, min(cores, idle))
    log.debug("threads: %d of %d cores idle", n, cores)
    return n


def apply_threads(n: int) -> None:
    """Use ``n`` threads in torch (and so in kernels compiled from now on)."""
    import torch

    torch.set_num_threads(n)
