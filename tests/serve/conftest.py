"""Fixtures of the serving tests (defined in serve_helpers.py)."""

from serve_helpers import server, tiny_folder, tiny_lm  # noqa: F401
