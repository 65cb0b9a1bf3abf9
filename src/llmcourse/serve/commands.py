"""CLI: ``llmcourse serve`` — the OpenAI-compatible server (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from llmcourse.core.cli_common import (
    Result,
    add_chat_template_args,
    add_common_args,
    add_config_args,
    add_model_args,
    model_kwargs,
    positive_int,
)
from llmcourse.core.lab import add_parser

log = logging.getLogger(__name__)

EPILOG = """examples:
  llmcourse serve                                   # the default model on http://127.0.0.1:8000
  llmcourse serve --model m.gguf --max-batch 4 --port 8080 --api-key secret
  llmcourse serve --speculative lookup --draft-tokens 8  # greedy answers that quote the prompt, faster
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'"""


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.serve import LAB

    p = add_parser(sub, groups, LAB, "serve", epilog=EPILOG,
                   description="Serve --model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                   "/v1/completions, /v1/models, /health, /metrics, a chat page at /). Concurrent requests are "
                   "batched into one decode step (continuous batching). Stops gracefully on SIGTERM / Ctrl-C.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network). "
                   "Default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="TCP port. Default: %(default)s")
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together. Default: %(default)s")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get HTTP 429. "
                   "Default: %(default)s")
    p.add_argument("--ctx", type=positive_int, default=2048, help="context per sequence (prompt + completion), "
                   "capped by the model's. Default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get("LLMCOURSE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLMCOURSE_API_KEY, else no key)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may run. Default: %(default)s")
    p.add_argument("--max-body", type=positive_int, default=1 << 20, help="largest request body in bytes. "
                   "Default: %(default)s")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="prompt tokens prefilled between two decode steps. Default: %(default)s")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the --model value)")
    from llmcourse.decoding import SpeculativeConfig

    g = p.add_argument_group("speculative decoding (greedy requests, while one sequence runs)")
    g.add_argument("--speculative", choices=("off", "lookup"), default="off",
                   help="lookup: prompt-lookup speculative decoding (draft the tokens that followed the text's last "
                   "n-gram earlier, verify them in one forward) for a greedy request (temperature 0) while it is "
                   "the only running sequence; the tokens are those of plain greedy decoding. Sampled requests, "
                   "and every request while several run (the batched step shares each pass over the weights "
                   "already), decode as usual. Default: %(default)s")
    g.add_argument("--draft-tokens", type=int, default=3, help="--speculative lookup: tokens drafted per round, "
                   "verified in one forward (a fixed number here; generate --speculative lookup chooses per round). "
                   "Default: %(default)s")
    add_config_args(g, SpeculativeConfig, exclude=("speculative", "draft_model", "draft_tokens"))
    add_chat_template_args(p)
    add_common_args(p)
    # OpenMP keeps its default wait policy (its threads spin ~3 ms at a barrier before they sleep): with all
    # the computing in the batcher's one thread, 1 client got 35 tok/s, against 20 with OMP_WAIT_POLICY=PASSIVE,
    # where each of the step's parallel regions waits on a futex (bench/serve.py, 2026-12-07)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> Result:
    import torch
    import uvicorn

    from llmcourse.core.models import load_model
    from llmcourse.serve.app import ServeSettings, create_app

    # the batcher's thread does all the computing with the chosen threads; this (the HTTP) thread loads
    # the model with one, so that it never holds an OpenMP team of its own (see ContinuousBatcher.start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = ServeSettings(max_batch=args.max_batch, max_queue=args.max_queue, ctx=args.ctx, api_key=args.api_key,
                             timeout=args.timeout, max_body=args.max_body, prefill_chunk=args.prefill_chunk,
                             model_name=args.name or args.model, threads=threads, speculative=args.speculative,
                             draft_tokens=args.draft_tokens, lookup_ngram=args.lookup_ngram)
    from llmcourse.core.chat_template import set_chat_template

    lm = load_model(args.model, **model_kwargs(args))
    set_chat_template(lm.tokenizer, args.chat_template)
    app = create_app(lm, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="debug" if args.debug else "info",
                            timeout_graceful_shutdown=int(min(settings.timeout, 600)))
    server = DrainingServer(config, app)
    server.run()
    return Result({"host": args.host, "port": args.port, "requests": app.state.batcher.stats["requests"]}, "")


class DrainingServer:
    """uvicorn's server that, on SIGTERM / SIGINT, refuses new requests (503) while running ones finish."""

    def __init__(self, config: Any, app: Any) -> None:
        import uvicorn

        app_state = app.state.serve

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                app_state["draining"] = True
                super().handle_exit(sig, frame)
                # uvicorn re-raises the signal after its graceful shutdown (the process then dies of
                # it); a drained server exits 0 instead
                self._captured_signals.clear()

        self.server = _Server(config)

    def run(self) -> None:
        self.server.run()
