"""How the runtime uses TorchInductor: the compile options, the recompile limits, and whether it can compile.

The decode step is compiled with one specialisation per shape (weight shapes, rows, cache sizes): that is
the design, so Dynamo's recompile limits are raised — inside :func:`compile_settings`, around each
compiled call, never globally. Dynamo keeps compiled code per function, so every object that wraps the
same function with :func:`compile_fn` shares its specialisations.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from llmcourse.core.env import env_choice

# Inductor checks each input's sizes and strides again in Python on every call (assert_size_stride);
# Dynamo's guards already check them (dynamic=False), and with ~30 inputs per layer the re-checks cost
# ~5 ms of a 4-bit step of ~17 ms (30 layer calls; measured on this 2-core machine). And it inlines a
# normed activation used by several products into each of them, recomputing ``x · rsqrt · w`` for every
# weight row; realizing it once (a threshold of 1 read) took the 4-bit step from ~16.5 to ~14.5 ms.
COMPILE_OPTIONS = {"size_asserts": False, "realize_reads_threshold": 1}
RECOMPILE_LIMIT = 1024


def compile_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by TorchInductor: whole graph, static shapes, the runtime's options."""
    return torch.compile(fn, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Dynamo's recompile limits raised for the calls inside (Dynamo's config is per thread: a server's
    scheduler thread gets them too), restored after."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, RECOMPILE_LIMIT),
                             accumulated_recompile_limit=max(dynamo_config.accumulated_recompile_limit,
                                                             8 * RECOMPILE_LIMIT)):
        yield


@functools.cache
def skip_repeat_guards() -> bool:
    """Whether :class:`KnownCalls` skips Dynamo's guard checks on a repeated call (the default);
    ``LLMCOURSE_GUARDS=all`` checks them on every call (read once)."""
    return env_choice("LLMCOURSE_GUARDS", ("repeat", "all"), "repeat") != "all"


class KnownCalls:
    """Calls of a compiled function whose arguments' varying parts (shapes, strides, dtypes, the slice of layers:
    the caller's ``key``) were seen before skip Dynamo's guard evaluation
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: only the guards that tell its compiled entries
    apart run). The decode step's guards cover ~340 tensors and ~1,100 other values (every weight's shape and
    every layer's constants) and cost ~0.5 ms of a ~9 ms 4-bit step on this machine, for values that never
    change between steps. A key seen before means Dynamo holds an entry compiled for exactly that call, so
    choosing among the entries is all the checking needed; a new key runs with every guard (and compiles).
    The stance is process-wide, so every call through a :class:`KnownCalls` holds one lock: a call that needs
    its guards never overlaps one that skips them."""

    lock = threading.RLock()

    def __init__(self) -> None:
        self.seen: set[Hashable] = set()

    def __call__(self, fn: Callable[..., Any], key: Hashable, *args: Any) -> Any:
        with self.lock:
            if key in self.seen and skip_repeat_guards():
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return fn(*args)
            out = fn(*args)
            self.seen.add(key)
            return out


def can_compile() -> bool:
    """Whether TorchInductor can build CPU kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """Compile ``t``'s dimension ``dim`` as a symbol (a batch's attention window): one kernel for all sizes."""
    torch._dynamo.mark_dynamic(t, dim)
