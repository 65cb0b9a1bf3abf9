"""llmcourse: the Large Language Model Course as a tested CPU library and CLI.

Core (``llmcourse.core``) loads models and data and evaluates them; each lab
(``decoding``, ``quant``...) builds on the core and never on another lab's internals.
"""

__version__ = "0.1.0"

from llmcourse import labs as _labs  # noqa: E402,F401  (registers every lab's folder formats with core)
