"""Serving lab: an OpenAI-compatible HTTP server on our decoding engine, with continuous batching.

``llmcourse serve --model M`` answers ``/v1/chat/completions``, ``/v1/completions`` (streaming
SSE or not), ``/v1/models``, ``/health``, ``/metrics`` and a chat page at ``/``. Concurrent
requests share one decode step (:class:`llmcourse.serve.batch.ContinuousBatcher`, continuous batching on
the model runtime's decoder layer). FastAPI and
uvicorn are imported only by the command (``pip install 'llmcourse[serve]'``).

Public API (lazy)::

    from llmcourse.serve import create_app
    app = create_app(lm, max_batch=8)      # a FastAPI app; run it with uvicorn
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="serve",
    title="Serving (OpenAI-compatible API)",
    commands={"serve": "serve a model over an OpenAI-compatible HTTP API, batching concurrent requests"},
    commands_module="llmcourse.serve.commands",
    tour="llmcourse.serve.tour:section",
    requires={"fastapi": "pip install 'llmcourse[serve]'", "uvicorn": "pip install 'llmcourse[serve]'"},
    docs="docs/serve.md",
)

_PUBLIC = {"app": ("create_app", "ServeSettings"),
           "batch": ("BatchSession", "BatchRequest", "BatchEvent", "ContinuousBatcher", "QueueFull")}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
