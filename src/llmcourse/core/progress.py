"""Progress bars on stderr (tqdm), so ``--json`` output on stdout stays clean.

Bars show on a terminal and stay quiet in pipes and tests unless LLMCOURSE_PROGRESS=1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
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
