"""The OpenAI-compatible HTTP API (FastAPI), in front of a :class:`~llmcourse.serve.batch.ContinuousBatcher`.

Contract (as the OpenAI API): ``POST /v1/chat/completions`` and ``POST /v1/completions``, with
``stream: true`` answered as Server-Sent Events (``data: {chunk}\\n\\n`` ... ``data: [DONE]``):
a choice's first chunk carries ``delta.role = "assistant"``, its last chunk ``finish_reason``
("stop" | "length") and no content, then one chunk with ``choices: []`` and ``usage`` when
``stream_options.include_usage`` is set. Errors are ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status (400 bad field, 401 key, 404, 413 body or prompt too large, 429 queue
full with ``Retry-After``, 503 shutting down, 504 timed out). Unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcourse.core.errors import UserError
from llmcourse.decoding import GenerationConfig, SpeculativeConfig, chat_prompt_ids, sampling_defaults
from llmcourse.serve.batch import BatchRequest, ContinuousBatcher, QueueFull
from llmcourse.serve.page import PAGE

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServeSettings:
    """The server's limits (the ``llmcourse serve`` flags)."""

    max_batch: int = 8
    max_queue: int = 64
    ctx: int = 2048
    api_key: str | None = None
    timeout: float = 600.0  # seconds a request may run
    max_body: int = 1 << 20  # bytes
    prefill_chunk: int = 128
    matvec: str = "auto"
    model_name: str = "llmcourse"
    threads: int | None = None  # compute threads of the batcher's thread (default: the caller's)
    # what a request that sets no sampling field gets (create_app: the model's generation_config.json, else
    # the chat command's defaults)
    sampling: dict[str, Any] = field(default_factory=dict)
    # speculative decoding by prompt lookup for greedy requests while one sequence runs (ContinuousBatcher)
    speculative: str = "off"
    draft_tokens: int = 3  # a fixed number per round: the server has no LookupPolicy (decoding/speculative.py)
    lookup_ngram: int = SpeculativeConfig.lookup_ngram

    def __post_init__(self) -> None:
        if self.speculative not in ("off", "lookup"):
            raise UserError(f"--speculative {self.speculative!r} is not served",
                            "pass --speculative lookup (the server drafts by prompt lookup only) or off")
        SpeculativeConfig(self.speculative, self.draft_tokens, self.lookup_ngram)  # checks K and n
        for name in ("max_batch", "ctx", "max_body", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1", f"pass --{name.replace('_', '-')} 1 or more")
        if self.max_queue < 0 or not self.timeout > 0:
            raise UserError("--max-queue must be >= 0 and --timeout > 0", "pass e.g. --max-queue 64 --timeout 600")


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- request fields ---------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be an integer {want}, got {v!r}", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return tuple(s for s in v if s)


def _content(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts are understood
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
    return {"role": message["role"], "content": content}


@dataclass
class Parsed:
    prompt_ids: list[int]
    config: GenerationConfig
    n: int
    stream: bool
    include_usage: bool


def parse_request(body: Any, chat: bool, tokenizer: Any, s: ServeSettings) -> Parsed:
    """Validate an OpenAI request body -> prompt tokens and the generation settings (ApiError 400/413)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        turns = [_content(m, i) for i, m in enumerate(messages)]
        try:
            ids = chat_prompt_ids(tokenizer, turns)
        except UserError as e:
            raise ApiError(400, str(e), "messages") from e
        except Exception as e:  # a template that rejects these roles (jinja raises its own errors)
            raise ApiError(400, f"the chat template rejected the messages: {e}", "messages") from e
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt).input_ids) if prompt else []
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < len(tokenizer) for t in ids):
                raise ApiError(400, "'prompt' token ids must be in the vocabulary", "prompt")
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise ApiError(400, "'prompt' is empty", "prompt")
            ids = [bos]
    if len(ids) >= s.ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the context of {s.ctx} allows "
                       "(leave room for one new token)", "messages" if chat else "prompt", "context_length_exceeded")
    room = s.ctx - len(ids)
    max_tokens = _integer(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                          None, 1)
    temperature = _number(body, "temperature", s.sampling.get("temperature", 1.0), 0.0, 2.0)
    # the defaults are a sampling recipe: a greedy request (temperature 0) gets none of them, so its tokens
    # are the model's own greedy ones
    d = s.sampling if temperature else {}
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    n = _integer(body, "n", 1, 1, s.max_batch)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", "model")
    try:
        cfg = GenerationConfig(
            strategy="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0,
            top_p=_number(body, "top_p", d.get("top_p", 1.0), 1e-9, 1.0), top_k=_integer(body, "top_k", d.get("top_k", 0), 0),
            min_p=_number(body, "min_p", d.get("min_p", 0.0), 0.0, 1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_number(body, "repetition_penalty", d.get("repetition_penalty", 1.0), 1e-6, 10.0),
            penalty_last_n=d.get("penalty_last_n", 0),
            seed=None if seed is None else seed % 2**63, stop=_stop(body),
            max_new_tokens=min(max_tokens or room, room), eos_token_ids=(),
            num_return_sequences=1)
    except UserError as e:
        raise ApiError(400, str(e)) from e
    return Parsed(ids, cfg, n, bool(stream), bool(opts.get("include_usage", False)))


# --- metrics ----------------------------------------------------------------------------------------

class Metrics:
    """Counters and a time-to-first-token histogram, written as Prometheus text."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def first_token(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
        self.ttft[i] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1

    def text(self, b: ContinuousBatcher) -> str:
        out = ["# HELP llmcourse_requests_total HTTP requests by endpoint and status.",
               "# TYPE llmcourse_requests_total counter"]
        for (ep, st), v in sorted(self.requests.items()):
            out.append(f'llmcourse_requests_total{{endpoint="{ep}",status="{st}"}} {v}')
        for name, kind, helptext, value in (
            ("prompt_tokens_total", "counter", "Prompt tokens of answered requests.", b.stats["prompt_tokens"]),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens found in a slot's cache (no prefill).",
             b.stats["cached_prompt_tokens"]),
            ("completion_tokens_total", "counter", "Tokens generated.", b.stats["completion_tokens"]),
            ("decode_steps_total", "counter", "Batched decode steps.", b.stats["steps"]),
            ("speculative_drafted_tokens_total", "counter", "Tokens drafted by prompt lookup (--speculative).",
             b.stats["drafted"]),
            ("speculative_accepted_tokens_total", "counter", "Drafted tokens the model accepted.", b.stats["accepted"]),
            ("queue_depth", "gauge", "Requests waiting for a slot.", b.queue_depth),
            ("batch_size", "gauge", "Sequences in the running batch.", b.batch_size),
            ("free_slots", "gauge", "Free KV cache slots.", b.free_slots),
        ):
            out += [f"# HELP llmcourse_{name} {helptext}", f"# TYPE llmcourse_{name} {kind}", f"llmcourse_{name} {value}"]
        out += ["# HELP llmcourse_time_to_first_token_seconds From arrival to the first token.",
                "# TYPE llmcourse_time_to_first_token_seconds histogram"]
        acc = 0
        for b_, c in zip((*TTFT_BUCKETS, "+Inf"), self.ttft, strict=True):
            acc += c
            out.append(f'llmcourse_time_to_first_token_seconds_bucket{{le="{b_}"}} {acc}')
        out += [f"llmcourse_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"llmcourse_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(out) + "\n"


# --- the app ----------------------------------------------------------------------------------------

def create_app(lm: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``lm`` (a :class:`~llmcourse.core.models.LoadedModel`).

    The batcher thread starts with the app (lifespan) and drains on shutdown.
    """
    s = settings or ServeSettings()
    if not s.sampling:
        s.sampling = sampling_defaults(lm.path)
    tokenizer = lm.tokenizer
    ctx_limit = getattr(lm.model.config, "max_position_embeddings", None) or s.ctx
    s.ctx = min(s.ctx, ctx_limit)
    batcher = ContinuousBatcher(lm.model, tokenizer, max_batch=s.max_batch, ctx=s.ctx, max_queue=s.max_queue,
                                prefill_chunk=s.prefill_chunk, matvec=s.matvec,
                                speculative=SpeculativeConfig(s.speculative, s.draft_tokens, s.lookup_ngram))
    metrics = Metrics()
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 (FastAPI's protocol)
        # the batcher's thread compiles the step buckets itself, whenever it is idle: all tensor work stays in
        # that one thread, and the server answers at once (/health says "warming" until they are compiled)
        batcher.start(threads=s.threads, warmup=True)
        await asyncio.to_thread(batcher.ready.wait)
        yield
        state["draining"] = True
        await asyncio.to_thread(batcher.stop, 30.0)

    app = FastAPI(title="llmcourse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.settings, app.state.metrics, app.state.serve = batcher, s, metrics, state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code)
        return response

    def check(request: Request) -> None:
        if s.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {s.api_key}":
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", kind="authentication_error")
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > s.max_body:
            raise ApiError(413, f"the body is larger than {s.max_body} bytes", code="body_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > s.max_body:
                raise ApiError(413, f"the body is larger than {s.max_body} bytes", code="body_too_large")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from e

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> JSONResponse:
        if state["draining"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        done, total = batcher.warm_progress
        return JSONResponse({"status": "warming" if batcher.warming else "ok", "warm_up": f"{done}/{total}",
                             "queue_depth": batcher.queue_depth, "batch_size": batcher.batch_size})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.text(batcher)

    def model_card() -> dict[str, Any]:
        return {"id": s.model_name, "object": "model", "created": 0, "owned_by": "llmcourse",
                "sampling_defaults": s.sampling}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict[str, Any]:
        check(request)
        if name != s.model_name:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool) -> Response:
        check(request)
        p = parse_request(await read_json(request), chat, tokenizer, s)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = BatchRequest(p.prompt_ids, p.config, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                           n=p.n, deadline=time.monotonic() + s.timeout)
        try:
            batcher.submit(req)
        except QueueFull as e:
            if state["draining"] or batcher.stopping:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down") from e
            retry = 1 + batcher.queue_depth // max(1, s.max_batch)
            raise ApiError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error", headers={"Retry-After": str(retry)}) from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if p.stream:
            return StreamingResponse(stream(request, req, events, rid, created, chat, p),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * p.n, [None] * p.n
        usage = None
        try:
            while usage is None:
                ev = await next_event(request, events, req)
                if ev is None:
                    return Response(status_code=499)
                if ev.kind == "token":
                    texts[ev.index] += ev.text
                elif ev.kind == "done":
                    reasons[ev.index] = ev.finish_reason
                elif ev.kind == "error":
                    status = 504 if "timed out" in ev.text else 500
                    raise ApiError(status, ev.text, kind="server_error", code="timeout" if status == 504 else None)
                elif ev.kind == "end":
                    usage = ev
        finally:
            batcher.cancel(req)  # a no-op once it ended
        note_ttft(req)
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   if chat else {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": s.model_name, "choices": choices, "usage": usage_of(usage)})

    def note_ttft(req: BatchRequest) -> None:
        if req.first_token is not None:
            metrics.first_token(req.first_token - req.submitted)

    async def next_event(request: Request, events: asyncio.Queue, req: BatchRequest) -> Any:
        """The next event, or None when the client went away (its slots are freed at once)."""
        if not events.empty():  # already there (the usual case under load): no timer, no task
            return events.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    batcher.cancel(req)
                    return None

    async def stream(request: Request, req: BatchRequest, events: asyncio.Queue, rid: str, created: int, chat: bool,
                     p: Parsed) -> Any:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> str:
            body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": s.model_name,
                                    "choices": choices}
            if p.include_usage or with_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def choice(i: int, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

        try:
            if chat:
                for i in range(p.n):
                    yield chunk([choice(i, None, None, role=True)])
            while True:
                ev = await next_event(request, events, req)
                if ev is None:
                    return
                if ev.kind == "token":
                    yield chunk([choice(ev.index, ev.text, None)])
                elif ev.kind == "done":
                    yield chunk([choice(ev.index, None, ev.finish_reason)])
                elif ev.kind == "error":
                    err = ApiError(504 if "timed out" in ev.text else 500, ev.text, kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                elif ev.kind == "end":
                    note_ttft(req)
                    if p.include_usage:
                        yield chunk([], usage_of(ev), with_usage=True)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            batcher.cancel(req)  # the client went away, or the stream ended: free the slots now

    return app


def usage_of(ev: Any) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}
