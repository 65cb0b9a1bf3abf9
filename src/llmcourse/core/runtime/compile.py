"""How the runtime uses TorchInductor: the compile options, the recompile limits, and whether it can compile.

The decode step is compiled with one specialisation per shape (weight shapes, rows, cache sizes): that is
the design, so Dynamo's recompile limits are raised — inside :func:`compile_settings`, around each
compiled call, never globally. Dynamo keeps compiled code per function, so every object that wraps the
same function with :func:`compile_fn` shares its specialisations.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

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


def can_compile() -> bool:
    """Whether TorchInductor can build CPU kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """Compile ``t``'s dimension ``dim`` as a symbol (a batch's attention window): one kernel for all sizes."""
    torch._dynamo.mark_dynamic(t, dim)
