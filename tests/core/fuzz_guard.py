"""The fuzz suites' guard around one case: a hang (over 30 s) or a memory spike (over 2 GB) fails it.

Memory: the kernel's high-water mark of resident memory (``VmHWM``) is reset to the current resident size
before the case (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0) and read after it, so every
spike counts, however short, and whether or not the code holds the GIL.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

MAX_SPIKE = 2 << 30


class Hang(Exception):
    """The case ran past its time limit."""


class MemorySpike(Exception):
    """The case took more memory than the limit."""


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _alarm(signum, frame):
    raise Hang()


@contextmanager
def guarded(seconds: int = 30, max_bytes: int = MAX_SPIKE) -> Iterator[None]:
    """Run the body with a time limit (SIGALRM) and a limit on resident memory above its start."""
    _reset_peak()
    start = _status_kb("VmRSS")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        rise = _status_kb("VmHWM") - start
        if rise > max_bytes:
            raise MemorySpike(f"resident memory rose by {rise / 2**30:.2f} GB")
