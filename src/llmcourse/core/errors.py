"""User-facing errors.

A :class:`UserError` is bad input (a missing file, a corrupt checkpoint, an impossible
parameter). The CLI prints its message on one line and exits with code 2; library
callers catch it like any exception. The message names the problem *and* the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: one line that says what is wrong and what to do."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        msg = problem.rstrip(".")
        if fix:
            msg = f"{msg}: {fix}"
        super().__init__(msg.replace("\n", " "))


def check(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise :class:`UserError` unless ``condition`` holds (validation at the boundary)."""
    if not condition:
        raise UserError(problem, fix)
