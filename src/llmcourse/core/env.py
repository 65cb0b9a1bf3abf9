"""Environment overrides (``LLMCOURSE_*``): one reader for every switch that picks among named choices.

Each switch is read once per process by a ``functools.cache`` function that calls :func:`env_choice` (tests
that set one clear that function's cache: tests/conftest.py ``ENV_SWITCHES``); a value that is not one of the
choices logs one warning naming the variable, the value and the choices, and the default is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger("llmcourse.env")


def env_choice(var: str, choices: Iterable[str], default: str) -> str:
    """``$var`` (stripped, lower case) if it is one of ``choices``, else ``default`` (unset or empty: silently;
    anything else: with one warning)."""
    options = tuple(choices)
    value = os.environ.get(var, "").strip().lower()
    if value and value not in options:
        log.warning("%s=%s is not one of %s; using %s", var, value, ", ".join(options), default or "the default")
    return value if value in options else default
