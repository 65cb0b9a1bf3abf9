"""Continuous batching: requests join and leave one running batch at step boundaries.

Iteration-level scheduling (Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models"): instead of batching whole requests, the scheduler
decides again before every decode step which sequences run. A sequence owns one *slot* of a
fixed-size KV cache (``max_batch`` slots x ``ctx`` positions); every slot has its own position
``p_b``, so one step computes, for each active slot ``b`` and new token ``x_b``,

    q_b, k_b, v_b = W_q n(x_b), W_k n(x_b), W_v n(x_b)          rotated at position p_b (RoPE)
    K[b, :, p_b], V[b, :, p_b] = k_b, v_b                        (per-slot cache write)
    attn_b = softmax(q_b K[b]^T / sqrt(d) + M[b]) V[b],   M[b, j] = 0 if j <= p_b else -inf

with every weight read once per step for all slots together (decoding is bound by reading the
weights: B rows cost little more than one). Prompts are prefilled one chunk at a time between
decode steps (chunked prefill, as in Sarathi, Agrawal et al. 2023), so a long prompt stalls the
running streams for one chunk at most. A slot keeps its prompt's K/V after its request ends, and a
new prompt takes the free slot that holds its longest beginning and is prefilled from there
(prefix caching, as llama.cpp's server reuses a slot: a chat's system prompt is computed once).

:class:`BatchSession` is the state (cache, positions) and the forward on a shared
:class:`~llmcourse.core.runtime.FastModel`; :class:`ContinuousBatcher` is the scheduler
(a thread) that samples each sequence with its own sampler chain and ``torch.Generator``.
A sequence's greedy tokens are those of :func:`~llmcourse.decoding.generate` for its prompt alone
(tested on the eager and compiled paths: the same decoder layer runs both).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcourse.core.runtime import CAPACITY_STEP, FastModel, runtime_for
from llmcourse.core.runtime.compile import compile_settings, mark_dynamic
from llmcourse.decoding import (
    CHAINS,
    GenerationConfig,
    PromptLookup,
    SpeculativeConfig,
    TextStream,
    apply_chain,
    model_eos_ids,
    sample,
)

log = logging.getLogger(__name__)

EXACT_ROWS = 8  # up to this many rows, each row count compiles its own step (no padding rows)
# Steps of up to this many rows take the runtime's layers_per_call (the whole stack in one compiled call for a
# GGUF model); wider ones one call per layer: every bucket x window compiles its own graph, and the whole stack's
# first compilation (~60 s against ~11 s for a layer, under load) for 24 of them would keep a server warming up
# for ~25 minutes. One stream's step, the one whose per-call overhead weighs most, gets the whole stack.
STACK_ROWS = 1


def step_buckets(max_batch: int) -> list[int]:
    """Row counts the compiled step is built for: every count up to :data:`EXACT_ROWS`, then powers of two
    (and ``max_batch``). A padding row costs as much as a real one: the several-row products are bound
    by their arithmetic, not by reading the weights (measured: 1 row 40 ms, 8 rows 118 ms, one thread),
    so 5 rows padded to 8 would pay 3 rows for nothing."""
    sizes = set(range(1, min(max_batch, EXACT_ROWS) + 1))
    sizes |= {min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)}
    return sorted(sizes)


class BatchSession:
    """A KV cache of ``max_batch`` slots x ``capacity`` positions, each slot at its own position.

    ``slot = s.acquire()``; ``s.prefill(slot, ids)`` (in chunks, any number of calls);
    ``s.step(slots, tokens)`` one token for each listed slot; ``s.release(slot)``. Every forward is the
    runtime's one decoder layer (:meth:`~llmcourse.core.runtime.FastModel.run`): a prefill chunk writes
    one slot's positions; a step writes row ``b``'s token into slot ``slots[b]`` at that slot's position.
    The compiled step pads the rows to a bucket (:func:`step_buckets`: 1, 2, ..., 8, 16, ... max_batch)
    with a scratch slot, so it compiles once per bucket; it falls back to the eager step if compiling fails.
    """

    def __init__(self, fast: FastModel, max_batch: int, capacity: int) -> None:
        if max_batch < 1 or capacity < 2:
            raise ValueError("max_batch must be >= 1 and capacity >= 2")
        self.fast = fast
        self.max_batch = max_batch
        self.capacity = fast.cache_size(capacity)
        self.compiled = fast.matvec == "compiled"
        # the last slot is scratch (padding rows)
        self.k_cache, self.v_cache = fast.new_cache(max_batch + 1, self.capacity)
        fast.rope_tables(self.capacity)
        self.pos = [0] * (max_batch + 1)  # tokens cached per slot
        # per slot, the prompt tokens whose K/V a prefill wrote at positions 0, 1, ...: kept after release,
        # so a later prompt with the same beginning (a chat's system prompt) starts past it
        self.cached: list[list[int]] = [[] for _ in range(max_batch + 1)]
        self.free = list(range(max_batch))
        self.buckets = step_buckets(max_batch)
        self._warm: set[int] = set()  # buckets (rows) the compiled step has run
        self._failed: set[int] = set()  # buckets whose compilation failed (they run eagerly)
        self._verify_ok = True  # whether the compiled multi-token step (verify) works

    # --- slots -----------------------------------------------------------------------------------
    def acquire(self, prompt: list[int] | None = None) -> int:
        """A free slot. Without ``prompt`` it is empty (position 0); with it, the free slot whose cache
        already holds the longest beginning of ``prompt`` (prefix caching, as llama.cpp's server
        reuses a slot's prompt), positioned past it: ``pos[slot]`` prompt tokens need no prefill
        (at most ``len(prompt) - 1``: the last one is run for its logits). Raises IndexError when
        all slots are taken."""
        if not self.free:
            raise IndexError("no free slot")
        slot, reuse = self.free[0], 0
        if prompt:
            for s in self.free:
                n = common_prefix(self.cached[s], prompt, len(prompt) - 1)
                if n > reuse:
                    slot, reuse = s, n
        self.free.remove(slot)
        del self.cached[slot][reuse:]
        self.pos[slot] = reuse
        return slot

    @torch.inference_mode()
    def adopt_prefix(self, slot: int, prompt: list[int]) -> int:
        """Move ``slot`` (holding the first ``pos[slot]`` tokens of ``prompt``) past the longest beginning of
        ``prompt`` that any other slot's cache holds — a prompt served beside it (requests that arrive together
        share a chat template's system prompt) or a released one — by copying those positions' K/V instead of
        computing them again. At most ``len(prompt) - 1`` (the last token runs for its logits). Returns the new
        ``pos[slot]``."""
        best, src = self.pos[slot], None
        for s in range(self.max_batch):
            if s != slot:
                n = common_prefix(self.cached[s], prompt, len(prompt) - 1)
                if n > best:
                    best, src = n, s
        if src is None:
            return self.pos[slot]
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[slot, :, :best] = kc[src, :, :best]
            vc[slot, :, :best] = vc[src, :, :best]
        self.cached[slot] = list(prompt[:best])
        self.pos[slot] = best
        return best

    def release(self, slot: int) -> None:
        if slot in self.free or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not in use")
        self.free.append(slot)
        self.free.sort()

    @torch.inference_mode()
    def copy(self, src: int, dst: int) -> None:
        """Make slot ``dst`` a copy of ``src`` (``n`` > 1 choices share one prefilled prompt)."""
        p = self.pos[src]
        for kc, vc in zip(self.k_cache, self.v_cache, strict=True):
            kc[dst, :, :p] = kc[src, :, :p]
            vc[dst, :, :p] = vc[src, :, :p]
        self.pos[dst] = p
        self.cached[dst] = self.cached[src][:p]

    # --- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` (a chunk of the prompt) at ``slot``'s next positions -> last logits (1, V) fp32.

        The same forward as a session's prompt on one row (so one chunk from position 0 gives its very
        logits); later chunks attend causally to the cached positions too."""
        f = self.fast
        t, p0 = len(ids), self.pos[slot]
        if p0 + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {p0 + t}")
        del self.cached[slot][p0:]
        self.cached[slot] += ids
        pos, w = torch.arange(p0, p0 + t), p0 + t
        caches = [(k[slot:slot + 1, :, :w], v[slot:slot + 1, :, :w])
                  for k, v in zip(self.k_cache, self.v_cache, strict=True)]
        x = f.run(f.embed_ids(torch.tensor([ids])), caches, pos, None, pos.view(1, t), w, compiled=False)
        self.pos[slot] = p0 + t
        return f.logits(x[:, -1])  # (1, V)

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One new token per listed slot, ``tokens`` (B,) -> logits (B, V) fp32, all in one pass over the weights."""
        for s in slots:
            if self.pos[s] >= self.capacity:
                raise ValueError(f"slot {s} is full ({self.capacity} positions)")
            del self.cached[s][self.pos[s]:]  # a decoded token's K/V: not a prompt's (no reuse)
        if not self.compiled:
            return self._eager_step(slots, tokens)
        b = len(slots)
        bucket = next(n for n in self.buckets if n >= b)
        if bucket in self._warm:
            try:
                return self._compiled_step(slots, tokens, bucket)
            except Exception as exc:  # a new window shape that fails to compile: this bucket runs eagerly
                log.warning("torch.compile failed for %d rows (%s); those steps run eagerly, which is slower",
                            bucket, type(exc).__name__)
                self._warm.discard(bucket)
                self._failed.add(bucket)
                return self._eager_step(slots, tokens)
        if bucket in self._failed:
            return self._eager_step(slots, tokens)
        import torch._inductor.config as inductor_config

        try:
            # compile in this thread: Inductor's worker pool may already be shut down when the
            # first step runs in a server's thread ("cannot schedule new futures after shutdown")
            with inductor_config.patch(compile_threads=1):
                logits = self._compiled_step(slots, tokens, bucket)
        except Exception as exc:  # no working compiler or an Inductor failure: stay correct, run eagerly
            log.warning("torch.compile failed for %d rows (%s: %s); those steps run eagerly, which is slower",
                        bucket, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._failed.add(bucket)
            if not self._warm:
                self.compiled = False
            return self._eager_step(slots, tokens)
        self._warm.add(bucket)
        return logits

    def warm_tasks(self) -> list[tuple[int, int]]:
        """The compilations a warm server has done: each bucket (rows) at a small window, a middle one and the
        whole cache (Dynamo specialises a window that is the whole, contiguous, cache apart). Empty on the
        eager path."""
        if not self.compiled:
            return []
        ends = sorted({0, min(CAPACITY_STEP, self.capacity - 1), self.capacity - 1})
        return [(bucket, end) for bucket in self.buckets for end in ends]

    def warm(self, bucket: int, end: int) -> None:
        """Compile the step for ``bucket`` rows attending over ``end + 1`` positions, on the scratch slot only
        (no sequence's state is touched)."""
        scratch = self.max_batch
        if not self.compiled:
            return
        self.pos[scratch] = end
        self.step([scratch] * bucket, torch.zeros(bucket, dtype=torch.long))
        self.pos[scratch] = 0

    def warmup(self) -> None:
        """Compile every bucket now (:meth:`warm_tasks`; a no-op on the eager path)."""
        for bucket, end in self.warm_tasks():
            self.warm(bucket, end)

    def window(self, n: int) -> int:
        """Cache positions the compiled step attends over for ``n`` used ones: ``n`` rounded up to
        ``CAPACITY_STEP`` (at most the capacity). A window, not the whole cache: reading every
        slot's full capacity cost more than the weights at 8 rows and 2048 positions."""
        return min(self.capacity, -(-n // CAPACITY_STEP) * CAPACITY_STEP)

    def _forward_rows(self, slots: list[int], tokens: torch.Tensor, width: int, compiled: bool) -> torch.Tensor:
        """Row ``b``'s token at slot ``slots[b]``'s position, attending over ``width`` cache positions."""
        f = self.fast
        rows = torch.tensor(slots)
        pos = torch.tensor([self.pos[s] for s in slots])
        caches = [(k[:, :, :width], v[:, :, :width]) for k, v in zip(self.k_cache, self.v_cache, strict=True)]
        if compiled:  # one kernel for every window size
            for kc, vc in caches:
                mark_dynamic(kc, 2)
                mark_dynamic(vc, 2)
        x = f.embed_ids(tokens.view(-1, 1))
        if compiled:  # the whole step (layers, norm, head) in the runtime's compiled call(s)
            per_call = None if len(slots) <= STACK_ROWS else 1
            return f.step_logits(x, caches, pos, rows, pos.view(-1, 1), width, dynamic_width=True,
                                 layers_per_call=per_call)[:, 0]
        return f.logits(f.run(x, caches, pos, rows, pos.view(-1, 1), width, compiled=False)[:, 0])

    def _compiled_step(self, slots: list[int], tokens: torch.Tensor, bucket: int) -> torch.Tensor:
        b = len(slots)
        scratch = self.max_batch
        padded = slots + [scratch] * (bucket - b)
        tok = torch.cat((tokens.view(-1), torch.zeros(bucket - b, dtype=torch.long)))
        saved = self.pos[scratch]
        if bucket > b:
            self.pos[scratch] = 0
        window = self.window(max(self.pos[s] for s in padded) + 1)
        with compile_settings():
            logits = self._forward_rows(padded, tok, window, compiled=True)[:b]
        self.pos[scratch] = saved
        for s in set(slots):
            self.pos[s] += 1
        return logits

    def _eager_step(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """The same forward eagerly, over the positions the rows use."""
        logits = self._forward_rows(slots, tokens, max(self.pos[s] for s in slots) + 1, compiled=False)
        for s in slots:
            self.pos[s] += 1
        return logits

    @torch.inference_mode()
    def verify(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` (a token and the drafts after it) at ``slot``'s next positions -> every position's
        logits (T, V) fp32: a speculative round's verification, in one pass over the weights.

        Compiled, it is the runtime's multi-token step: the tokens padded to
        :meth:`~llmcourse.core.runtime.FastModel.verify_width` (the padding's keys land past the new
        position, hidden by the causal mask and overwritten later), the window a symbol as in :meth:`step`;
        eagerly (or if compiling fails), the prompt's forward. Roll back by setting ``pos[slot]``."""
        f = self.fast
        t, p0 = len(ids), self.pos[slot]
        n = f.verify_width(t)
        compiled = self.compiled and self._verify_ok and p0 + n <= self.capacity
        if p0 + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {p0 + t}")
        del self.cached[slot][p0:]
        if compiled:
            try:
                logits = self._verify(slot, ids + [ids[-1]] * (n - t), compiled=True)[:t]
            except Exception as exc:  # an Inductor failure: verify eagerly from now on
                log.warning("torch.compile failed for the multi-token step (%s); verifying eagerly",
                            type(exc).__name__)
                self._verify_ok = False
                logits = self._verify(slot, ids, compiled=False)
        else:
            logits = self._verify(slot, ids, compiled=False)
        self.pos[slot] = p0 + t
        return logits

    def _verify(self, slot: int, ids: list[int], compiled: bool) -> torch.Tensor:
        f = self.fast
        t, p0 = len(ids), self.pos[slot]
        pos = torch.arange(p0, p0 + t)
        width = self.window(p0 + t) if compiled else p0 + t
        caches = [(k[slot:slot + 1, :, :width], v[slot:slot + 1, :, :width])
                  for k, v in zip(self.k_cache, self.v_cache, strict=True)]
        if compiled:  # one kernel for every window size
            for kc, vc in caches:
                mark_dynamic(kc, 2)
                mark_dynamic(vc, 2)
        import torch._inductor.config as inductor_config

        with compile_settings(), inductor_config.patch(compile_threads=1):
            x = f.embed_ids(torch.tensor([ids]))
            if compiled:
                return f.step_logits(x, caches, pos, None, pos.view(1, t), width, dynamic_width=True)[0]  # (T, V)
            return f.logits(f.run(x, caches, pos, None, pos.view(1, t), width, compiled=False)[0])


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many first tokens ``a`` and ``b`` share, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


# --- the scheduler --------------------------------------------------------------------------------

@dataclass
class BatchEvent:
    """What the scheduler reports for a request (called from its thread).

    ``kind``: ``"token"`` (``text`` is the newly final text of choice ``index``, maybe empty),
    ``"done"`` (choice ``index`` finished with ``finish_reason`` "stop" | "length"), ``"end"``
    (every choice finished: ``prompt_tokens``/``completion_tokens`` are the usage) or ``"error"``
    (``text`` says why; nothing more follows).
    """

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # "done": the choice's generated tokens


@dataclass
class BatchRequest:
    """One request: its prompt, its settings (``config.max_new_tokens``, the sampler fields, ``seed``,
    ``stop``), ``n`` choices, and ``on_event`` which receives :class:`BatchEvent` objects."""

    prompt_ids: list[int]
    config: GenerationConfig
    on_event: Callable[[BatchEvent], None]
    n: int = 1
    deadline: float | None = None  # time.monotonic() after which it is ended with an error
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # when its first token was sampled
    cancelled: bool = False


@dataclass
class _Choice:
    request: BatchRequest
    index: int
    slot: int
    ids: torch.Tensor  # (1, T) prompt and generated tokens (the penalties' context)
    stream: TextStream
    generator: torch.Generator | None
    tokens: int = 0
    next_token: int | None = None
    done: bool = False
    lookup: PromptLookup | None = None  # the prompt-lookup index of its text (speculative serving)


@dataclass
class _Job:
    """A request in flight: its choices' slots, and how much of the prompt is prefilled."""

    request: BatchRequest
    slots: list[int]
    prefilled: int = 0
    choices: list[_Choice] = field(default_factory=list)
    completion_tokens: int = 0


class QueueFull(Exception):
    """The scheduler's queue is full (the server answers 429)."""


class ContinuousBatcher:
    """A thread that runs requests through one :class:`BatchSession` with continuous batching.

    Each loop: admit waiting requests into free slots, prefill up to ``prefill_chunk`` prompt
    tokens (of one or several admitted prompts), then one decode step of every running sequence. ``submit`` raises :class:`QueueFull` beyond
    ``max_queue`` waiting requests; ``cancel`` frees a request's slots at the next step boundary.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 8, ctx: int = 2048, max_queue: int = 64,
                 prefill_chunk: int = 128, matvec: str = "auto", eos_token_ids: list[int] | None = None,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.fast = model if isinstance(model, FastModel) else runtime_for(model, matvec)
        self.tokenizer = tokenizer
        self.session = BatchSession(self.fast, max_batch, ctx)
        self.ctx = ctx
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        if eos_token_ids is None:
            eos_token_ids = [] if isinstance(model, FastModel) else model_eos_ids(model, tokenizer)
        self.eos = set(eos_token_ids)
        self.waiting: deque[BatchRequest] = deque()
        self.prefilling: list[_Job] = []
        self.running: list[_Choice] = []
        self.jobs: dict[int, _Job] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()  # set by the thread once it takes requests
        self._warm_todo: deque[tuple[int, int]] = deque()  # (bucket, end) compilations left to do when idle
        self._warm_total = 0
        self.stats = {"steps": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "requests": 0, "drafted": 0, "accepted": 0}
        if speculative is not None and speculative.speculative not in ("off", "lookup"):
            raise ValueError("the server drafts by prompt lookup only")
        self.spec = speculative if speculative is not None and speculative.enabled else None

    # --- the public side (any thread) ------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    @property
    def free_slots(self) -> int:
        return len(self.session.free)

    def start(self, threads: int | None = None, warmup: bool = False) -> None:
        """Start the scheduler thread; it computes with ``threads`` torch threads (default: the caller's).
        It takes requests at once (``ready`` is set); with ``warmup`` it compiles the step buckets
        (:meth:`BatchSession.warm_tasks`) one at a time whenever it has nothing else to do, logging each, so
        a server answers within seconds and is fully compiled a little later (``warming``/``warm_progress``);
        a request that needs a bucket not compiled yet compiles it on the spot.

        Keep every multi-threaded tensor operation of a process in this one thread (a server's main
        thread loads the model with one torch thread): libgomp stops spinning at its barriers once it
        manages more OpenMP threads than there are cores — each thread that ran a parallel region keeps
        its own team — and then every parallel region of the step waits on a futex. Measured on 2 cores:
        a one-row step of the default model took 55 ms in a second thread after the main thread had run
        2-thread regions, 29 ms when it had not (and 29 ms in the main thread)."""
        threads = threads or torch.get_num_threads()
        self._warm_todo = deque(self.session.warm_tasks()) if warmup else deque()
        if warmup and self.spec is not None and self.session.compiled:
            self._warm_todo.appendleft((-(self.spec.draft_tokens + 1), 0))  # the verification (see _warm_one)
            if self.spec.draft_tokens + 1 > 2:  # one draft (a short match, the end of a request) pads to width 2
                self._warm_todo.appendleft((-2, 0))
        self._warm_total = len(self._warm_todo)

        def run() -> None:
            torch.set_num_threads(threads)  # OpenMP's thread count is per thread
            self.ready.set()
            self._run()

        self.thread = threading.Thread(target=run, name="llmcourse-batcher", daemon=True)
        self.thread.start()

    @property
    def warming(self) -> bool:
        """Whether step buckets are still to be compiled in the background."""
        return bool(self._warm_todo)

    @property
    def warm_progress(self) -> tuple[int, int]:
        """(compilations done, compilations planned) of the background warm-up."""
        return self._warm_total - len(self._warm_todo), self._warm_total

    def _warm_one(self) -> None:
        """Compile the next planned bucket (the thread has nothing else to do)."""
        bucket, end = self._warm_todo.popleft()
        t0 = time.monotonic()
        try:
            if bucket < 0:  # speculative serving's multi-token step of -bucket tokens, on the scratch slot
                self.session.verify(self.session.max_batch, [0] * -bucket)
                self.session.pos[self.session.max_batch] = 0
            else:
                self.session.warm(bucket, end)
        except Exception:  # the step compiles on demand (or runs eagerly) instead
            log.exception("compiling the step for %d rows failed", bucket)
            self._warm_todo.clear()
            return
        done, total = self.warm_progress
        log.info("warm-up %d/%d: the step for %d rows at %d positions compiled in %.1f s", done, total, bucket,
                 end + 1, time.monotonic() - t0)
        if not self._warm_todo:
            log.info("warm-up done: every step bucket is compiled")

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is admitted or queued, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, request: BatchRequest) -> None:
        """Queue ``request``; raises :class:`QueueFull` when ``max_queue`` requests already wait,
        ValueError when it cannot fit (prompt too long, ``n`` above the slots)."""
        if request.n > self.session.max_batch:
            raise ValueError(f"n={request.n} is more than the server's {self.session.max_batch} batch slots")
        if len(request.prompt_ids) >= self.session.capacity:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.ctx}")
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            # rows asked for beyond the free slots: those requests wait (the queue)
            rows = sum(r.n for r in self.waiting) + request.n
            if rows > self.free_slots and len(self.waiting) - self.free_slots >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(request)
            self.cond.notify_all()

    def cancel(self, request: BatchRequest) -> None:
        """Stop ``request`` (a client went away): its slots are freed at the next step boundary."""
        with self.cond:
            request.cancelled = True
            self.cond.notify_all()

    # --- the scheduler thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                idle = not (self.waiting or self.prefilling or self.running or self.stopping)
                while idle and not self._warm_todo:
                    self.cond.wait()
                    idle = not (self.waiting or self.prefilling or self.running or self.stopping)
                if self.stopping and not (self.waiting or self.prefilling or self.running):
                    return
                if not idle:
                    self._admit()
            if idle:  # nothing to serve: compile the next step bucket in the meantime
                self._warm_one()
                continue
            try:
                self._drop_finished()
                budget = self.prefill_chunk  # prompt tokens per loop, over one or several prompts
                while self.prefilling and budget > 0:
                    budget -= self._prefill_chunk(self.prefilling[0], budget)
                if self.running:
                    self._decode_step()
            except Exception as exc:  # a bug or an out-of-memory: fail the requests in flight, keep serving
                log.exception("batch step failed")
                for job in list(self.jobs.values()):
                    self._end(job, error=f"internal error: {type(exc).__name__}: {exc}")

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            if self.free_slots < req.n:
                return
            self.waiting.popleft()
            first = self.session.acquire(req.prompt_ids)
            job = _Job(req, [first] + [self.session.acquire() for _ in range(req.n - 1)],
                       prefilled=self.session.pos[first])
            self.stats["cached_prompt_tokens"] += job.prefilled
            self.jobs[req.id] = job
            self.prefilling.append(job)

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            req = job.request
            if req.cancelled:
                self._end(job, error=None)
            elif req.deadline is not None and now > req.deadline:
                self._end(job, error="the request timed out")

    def _prefill_chunk(self, job: _Job, budget: int) -> int:
        """Prefill up to ``budget`` more prompt tokens of ``job``; once all are in, sample its first tokens.
        Returns the tokens prefilled."""
        req = job.request
        adopted = self.session.adopt_prefix(job.slots[0], req.prompt_ids)  # another slot may hold more of it
        if adopted > job.prefilled:
            self.stats["cached_prompt_tokens"] += adopted - job.prefilled
            job.prefilled = adopted
        ids = req.prompt_ids[job.prefilled:job.prefilled + budget]
        logits = self.session.prefill(job.slots[0], ids)
        job.prefilled += len(ids)
        if job.prefilled < len(req.prompt_ids):
            return len(ids)
        self.prefilling.remove(job)
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        prompt = torch.tensor([req.prompt_ids], dtype=torch.long)
        for i, slot in enumerate(job.slots):
            if i:
                self.session.copy(job.slots[0], slot)
            seed = req.config.seed
            gen = torch.Generator().manual_seed(seed + i) if seed is not None else None
            choice = _Choice(req, i, slot, prompt, TextStream(self.tokenizer, req.config.stop), gen)
            job.choices.append(choice)
            self._accept(job, choice, logits)
        if req.first_token is None:
            req.first_token = time.monotonic()
        self._after_tokens(job)
        return len(ids)

    def _decode_step(self) -> None:
        live = [c for c in self.running if not c.done]
        if not live:
            self.running = []
            return
        if self.spec is not None and len(live) == 1 and self._speculative_round(live[0]):
            return
        tokens = torch.tensor([c.next_token for c in live])
        logits = self.session.step([c.slot for c in live], tokens)
        self.stats["steps"] += 1
        touched: dict[int, _Job] = {}
        for row, c in enumerate(live):
            job = self.jobs[c.request.id]
            self._accept(job, c, logits[row:row + 1])
            touched[c.request.id] = job
        for job in touched.values():
            self._after_tokens(job)

    def _speculative_round(self, c: _Choice) -> bool:
        """Prompt-lookup speculative decoding for the one running sequence (greedy): draft the tokens that
        followed the text's last n-gram earlier, verify them and the next token in one multi-token forward,
        and take the drafts while they are the tokens greedy decoding picks, then the model's own token —
        the very tokens of plain steps (:mod:`llmcourse.decoding.speculative`). With several running
        sequences the batched step already shares each pass over the weights, so they take it instead.
        Returns False (nothing done) when the sequence samples or nothing is drafted."""
        cfg = c.request.config
        if cfg.strategy == "sample":
            return False
        s = self.session
        base = s.pos[c.slot]  # the cache holds everything but c.next_token
        k = min(self.spec.draft_tokens, cfg.max_new_tokens - c.tokens - 1, s.capacity - base - 1)
        if c.lookup is None:
            c.lookup = PromptLookup(self.spec.lookup_ngram)
        drafted = c.lookup.propose(c.ids[0].tolist(), k) if k > 0 else []
        if not drafted:
            return False
        logits = s.verify(c.slot, [c.next_token, *drafted])  # (γ + 1, V)
        self.stats["steps"] += 1
        job = self.jobs[c.request.id]
        accepted = 0
        for i in range(len(drafted) + 1):
            s.pos[c.slot] = base + i + 1  # as after the plain step that gave logits i
            self._accept(job, c, logits[i:i + 1])
            if i == len(drafted) or int(c.ids[0, -1]) != drafted[i]:
                break  # the model's own token: the round ends
            accepted += 1
            if c.done:
                break
        self.stats["drafted"] += len(drafted)
        self.stats["accepted"] += accepted
        self._after_tokens(job)
        return True

    def _accept(self, job: _Job, c: _Choice, logits: torch.Tensor) -> None:
        """Sample choice ``c``'s next token from ``logits`` (1, V); report its text; finish it if due."""
        cfg = c.request.config
        sampling = cfg.strategy == "sample"
        processed = apply_chain(logits, c.ids, cfg, CHAINS[cfg.chain], sampling=sampling)
        if sampling:
            tok = int(sample(torch.softmax(processed, dim=-1), c.generator)[0])
        else:
            tok = int(torch.argmax(processed, dim=-1)[0])
        c.tokens += 1
        job.completion_tokens += 1
        self.stats["completion_tokens"] += 1
        c.ids = torch.cat((c.ids, torch.tensor([[tok]])), dim=1)
        reason = None
        if tok in self.eos:
            reason = "stop"
            piece = c.stream.flush()
        else:
            piece = c.stream.push(tok)
            if c.stream.stopped:
                reason = "stop"
            elif c.tokens >= cfg.max_new_tokens or self.session.pos[c.slot] >= self.session.capacity:
                reason = "length"
                piece += c.stream.flush()
        if piece:
            c.request.on_event(BatchEvent("token", c.index, piece))
        if reason is not None:
            c.done = True
            c.request.on_event(BatchEvent("done", c.index, finish_reason=reason,
                                          token_ids=c.ids[0, len(c.request.prompt_ids):].tolist()))
        else:
            c.next_token = tok
            if c not in self.running:
                self.running.append(c)

    def _after_tokens(self, job: _Job) -> None:
        if all(c.done for c in job.choices):
            self._end(job, error=None, finished=True)

    def _end(self, job: _Job, error: str | None, finished: bool = False) -> None:
        """Free ``job``'s slots; report its end (usage) or ``error`` (a cancelled request hears nothing)."""
        req = job.request
        self.jobs.pop(req.id, None)
        if job in self.prefilling:
            self.prefilling.remove(job)
        self.running = [c for c in self.running if c.request is not req]
        for slot in job.slots:
            self.session.release(slot)
        self.stats["requests"] += 1
        if error is not None:
            req.on_event(BatchEvent("error", text=error))
        elif finished:
            req.on_event(BatchEvent("end", prompt_tokens=len(req.prompt_ids),
                                    completion_tokens=job.completion_tokens))
