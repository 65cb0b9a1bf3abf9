"""The runtime's model: a transformers causal LM's weights as :class:`LayerWeights`, and its sessions.

:class:`FastModel` holds the model's own tensors (read, never written; no copies except Gemma's
``1 + w`` norm weights) in two views: the eager one (``nn.Linear`` weights used in place, other modules
called) and, when the step is compiled, the compiled one (:class:`~llmcourse.core.runtime.weights.DecodePlugin`
kinds). Every forward — a prompt, one token per row, a batch of slots — runs
:func:`~llmcourse.core.runtime.layer.decoder_layer` through :meth:`FastModel.run`.

Two ways to run a decode step (one new token per row), chosen by ``matvec``:

- ``compiled`` (the default for models of 32 MB and more, "auto"): the whole step — every layer's
  :func:`decoder_layer`, the final norm and the head — is one call of the TorchInductor-compiled
  :func:`decode_stack` for a model with GGUF block weights; one call per layer for the others, whose
  first compilation would take minutes for no gain (``layers_per_call``, ``LLMCOURSE_STEP_LAYERS``): a product with
  a weight becomes one row-parallel pass over it (decoding one token is bound by reading every weight
  once); the norms, RoPE, the cache write and attention fuse into a few loops around it. The KV cache is a
  static tensor; a session's step attends over all of it with a mask, so each cache size (rounded up to 64)
  compiles once.
- ``mm`` (no compiler needed): the same layer eagerly, its products through ``matvec`` (a chunked
  ``torch.bmm``: a one-row ``F.linear`` runs at half the bandwidth here, shared/MACHINE.md).

A multi-token step (``forward(ids, all_logits=True)``: verifying a few drafted tokens, speculative
decoding) runs the same compiled layer over T positions, padded to a width of :data:`VERIFY_WIDTHS`
(one compilation per width and cache size): the products meet the T rows while each tile of a weight is
in cache (:func:`~llmcourse.core.runtime.weights.rows_dot`), so the weights are still read once, and T
tokens cost little more than one.

Prompts (prefill) run eagerly: many rows make the products compute-bound, where ``F.linear``'s GEMM is
the right tool. State is per call: each generation opens its own :class:`DecodeSession` (KV cache,
position), so several generations may run on one model at once, from several threads.

Logits match transformers within 1e-4 absolute in fp32 on both paths (tested per architecture): the
products sum in a different order, so they are not bit-identical.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

import torch
from torch import nn

from llmcourse.core.runtime.arch import Arch, arch_of, check_supported, model_type
from llmcourse.core.runtime.compile import KnownCalls, can_compile, compile_fn, compile_settings, mark_dynamic
from llmcourse.core.runtime.layer import LayerWeights, attention_mask, decoder_layer, head
from llmcourse.core.runtime.weights import (
    COMPILED_KINDS,
    BlockCodes,
    KernelOptions,
    PackedCodes,
    Weight,
    eager_weight,
    step_weight,
)

log = logging.getLogger(__name__)

MATVECS = ("auto", "compiled", "mm")
CAPACITY_STEP = 64  # the compiled step's KV cache grows in these steps (one compilation per size)
AUTO_MIN_BYTES = 32 * 2**20  # "auto" compiles the step for models with at least this many weight bytes
VERIFY_WIDTHS = (2, 4, 8, 12, 16)  # a compiled multi-token step pads its T tokens to the next of these widths
STEP_PROMPT = 6  # prompts up to this long run as one-token compiled steps on models with packed codes


@functools.cache
def forced_layers_per_call() -> int | None:
    """``LLMCOURSE_STEP_LAYERS`` (read once per process) as a count of layers per compiled call, or None when
    unset; a value that is not a count logs a warning and is ignored."""
    raw = os.environ.get("LLMCOURSE_STEP_LAYERS", "").strip()
    if raw and not raw.isdigit():
        log.warning("LLMCOURSE_STEP_LAYERS=%s is not a count of layers; using the default", raw)
    return int(raw) if raw.isdigit() else None


def default_layers_per_call(blocks: bool) -> int:
    """Layers per compiled call of the decode step, 0 = all of them (the whole stack, final norm and head in one
    call; see :func:`decode_stack`): ``LLMCOURSE_STEP_LAYERS`` if set (:func:`forced_layers_per_call`), else 0
    for a model with GGUF block weights and 1 for the others.

    Measured on the default model (1 thread, 2-core machine under load): the whole stack took a Q8_0 step from
    ~47 to ~25 ms and Q4_0 from ~34 to ~17 ms, for a first compilation of 50-60 s instead of ~15 s (~16 s once
    Inductor's cache holds it); the fp32 weights' step (bound by reading 538 MB) gained nothing measurable
    (47 vs 54 ms, noise) and its first compilation went from ~15 s to 106 s, so float and codes models keep one
    call per layer."""
    forced = forced_layers_per_call()
    if forced is not None:
        return forced
    return 0 if blocks else 1


def decode_stack(x: torch.Tensor, layers: tuple[LayerWeights, ...], plan: tuple[tuple[int, int], ...], arch: Arch,
                 caches: tuple[tuple[torch.Tensor, torch.Tensor], ...], pos: torch.Tensor, rows: torch.Tensor | None,
                 ropes: tuple[tuple[torch.Tensor, torch.Tensor], ...], masks: tuple[torch.Tensor, ...],
                 norm: torch.Tensor | None, head_w: Weight | None) -> torch.Tensor:
    """The compiled decode step: :func:`~llmcourse.core.runtime.layer.decoder_layer` over ``layers`` (a run of
    consecutive layers, each with its (kc, vc) of ``caches``), then, with ``head_w``, the final norm and head.

    ``plan`` holds each layer's index into ``ropes`` (-1: NoPE) and ``masks`` (its window). Compiled as one
    function, the loop unrolls into one graph: one Python call, one set of guards and one Inductor wrapper per
    step instead of one per layer (30 calls of the default model's layer cost ~15 ms of a ~38 ms 8-bit step
    in dispatch and glue). Returns (B, T, H), or fp32 logits (B, T, V) with the head."""
    for i, lw in enumerate(layers):
        (r, m), (kc, vc) = plan[i], caches[i]
        x = decoder_layer(x, lw, arch, kc, vc, pos, rows, ropes[r] if r >= 0 else None, masks[m])
    if head_w is None:
        return x
    return head(x, norm, head_w, arch.eps, arch.final_softcap)


def layer_modules(blk: nn.Module) -> dict[str, Any]:
    """A decoder layer's projections and norms by role (one layout for every supported architecture).

    ``qkv``/``gate_up`` are tuples of one fused module (Phi-3) or separate ones; ``n2`` is the norm before
    the MLP (Gemma's ``pre_feedforward_layernorm``); ``post_attn``/``post_mlp`` Gemma's sandwich norms."""
    a, m = blk.self_attn, blk.mlp
    gemma = hasattr(blk, "pre_feedforward_layernorm")
    return {
        "n1": blk.input_layernorm,
        "qkv": (a.qkv_proj,) if hasattr(a, "qkv_proj") else (a.q_proj, a.k_proj, a.v_proj),
        "o": a.o_proj,
        "n2": blk.pre_feedforward_layernorm if gemma else blk.post_attention_layernorm,
        "gate_up": (m.gate_up_proj,) if hasattr(m, "gate_up_proj") else (m.gate_proj, m.up_proj),
        "down": m.down_proj,
        "q_norm": getattr(a, "q_norm", None), "k_norm": getattr(a, "k_norm", None),
        "post_attn": blk.post_attention_layernorm if gemma else None,
        "post_mlp": blk.post_feedforward_layernorm if gemma else None,
    }


def projections(model: nn.Module) -> list[nn.Module]:
    """Every projection the runtime multiplies by: each layer's, then the output head."""
    out = []
    for blk in model.model.layers:
        mods = layer_modules(blk)
        out += [*mods["qkv"], mods["o"], *mods["gate_up"], mods["down"]]
    return [*out, model.lm_head]


def compilable(model: Any, kernels: KernelOptions | None = None) -> bool:
    """Whether the compiled step can run every projection (a plain ``nn.Linear`` or a plug-in's kind)."""
    kernels = kernels or KernelOptions.detect()
    try:
        mods = projections(model)
    except AttributeError:
        return False
    return all(isinstance(step_weight(m, kernels), COMPILED_KINDS) for m in mods)


def auto_matvec(model: Any, kernels: KernelOptions | None = None) -> str:
    """``compiled`` for a model whose projections all have a compiled form, big enough to repay the
    compilation (and a C++ compiler to compile with), else ``mm``; :class:`KernelOptions`' ``compile``
    (``LLMCOURSE_COMPILE``) forces either."""
    kernels = kernels or KernelOptions.detect()
    if kernels.compile is False or not compilable(model, kernels):
        return "mm"
    if kernels.compile:
        return "compiled"
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return "compiled" if size >= AUTO_MIN_BYTES and can_compile() else "mm"


class FastModel:
    """Our forward of a supported transformers causal LM with a static KV cache (see the module docstring).

    Holds the weights only; state lives in a :class:`DecodeSession`: ``s = fast.session(rows, capacity)``,
    ``s.prefill(prompt)``, ``s.step(tokens)``.
    """

    def __init__(self, model: nn.Module, matvec: str = "auto", kernels: KernelOptions | None = None,
                 layers_per_call: int | None = None) -> None:
        if matvec not in MATVECS:
            raise ValueError(f"matvec must be one of {MATVECS}, not {matvec!r}")
        check_supported(model_type(model))
        kernels = kernels or KernelOptions.detect()
        self.config = model.config
        self.arch: Arch = arch_of(model)
        inner = model.model
        self.embed = inner.embed_tokens
        # the norms' dtype, not the embedding's: reading ``.weight`` of a swapped embedding (the 8-bit lab's
        # Int8Embedding) would de-quantize the whole table
        self.dtype = inner.norm.weight.dtype
        if matvec == "auto":
            matvec = auto_matvec(model, kernels)
        elif matvec == "compiled" and not compilable(model, kernels):
            log.info("some projections have no compiled form: the runtime runs them eagerly (matvec 'mm')")
            matvec = "mm"
        self.matvec = matvec
        self.layers = [self._layer_weights(blk, eager_weight) for blk in inner.layers]
        self.step_layers: list[LayerWeights] = []
        if matvec == "compiled":
            self.step_layers = [self._layer_weights(blk, lambda m: step_weight(m, kernels)) for blk in inner.layers]
        self.norm = self._norm_weight(inner.norm)
        self.head_eager = eager_weight(model.lm_head)
        self.head_step: Weight | None = step_weight(model.lm_head, kernels) if matvec == "compiled" else None
        # A prompt's eager forward de-quantizes every packed layer (writes and reads a float weight); a
        # one-token step reads only the packed codes. Prompts of up to STEP_PROMPT tokens of such a model
        # run as steps: 4 tokens of the 4-bit default model in ~70 ms instead of ~110 ms.
        packed = any(isinstance(w, PackedCodes) for lw in self.step_layers
                     for w in (*lw.qkv, lw.o, *lw.gate_up, lw.down))
        self.step_prompt = STEP_PROMPT if packed else 0
        self.rotary = inner.rotary_emb
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # RoPE (L, rd) per table, grown on demand
        self._warm: set[tuple[int, int]] = set()  # (rows, capacity) shapes the compiled step has run
        self.head_compiled = False  # whether the compiled head has run (a step of either session kind)
        self.multi_ok = True  # whether the compiled multi-token step works (else it runs eagerly)
        self._lock = threading.Lock()  # compiling (first run of a shape) happens in one thread at a time
        n = len(self.layers)
        blocks = any(isinstance(w, BlockCodes) for lw in self.step_layers for w in (*lw.qkv, lw.o, *lw.gate_up, lw.down))
        per_call = default_layers_per_call(blocks) if layers_per_call is None else layers_per_call
        self.layers_per_call = n if per_call <= 0 else min(per_call, n)
        # each layer's (RoPE table, mask) as indices into the tuples the step passes (-1: no RoPE)
        self.plan = tuple((self.arch.rope_tables.index(k.rope) if k.rope is not None else -1,
                           self.arch.windows.index(k.window)) for k in self.arch.layers)
        self._stack_fn = compile_fn(decode_stack) if matvec == "compiled" else None
        self._stack_calls = KnownCalls()  # repeated step shapes skip Dynamo's guards
        self._head_fn = compile_fn(head) if matvec == "compiled" else None

    # --- weights ---------------------------------------------------------------------------------
    def _norm_weight(self, norm: nn.Module | None) -> torch.Tensor | None:
        if norm is None:
            return None
        w = norm.weight.detach()
        return w if not self.arch.norm_offset else w.float().add(self.arch.norm_offset).to(w.dtype)

    def _layer_weights(self, blk: nn.Module, view: Any) -> LayerWeights:
        m = layer_modules(blk)
        return LayerWeights(
            n1=self._norm_weight(m["n1"]), qkv=tuple(view(p) for p in m["qkv"]), o=view(m["o"]),
            n2=self._norm_weight(m["n2"]), gate_up=tuple(view(p) for p in m["gate_up"]), down=view(m["down"]),
            q_norm=self._norm_weight(m["q_norm"]), k_norm=self._norm_weight(m["k_norm"]),
            post_attn=self._norm_weight(m["post_attn"]), post_mlp=self._norm_weight(m["post_mlp"]))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def warm(self) -> bool:
        """Whether the compiled step has run (for some shape): using it again costs no compilation."""
        return bool(self._warm)

    def session(self, batch: int, capacity: int) -> DecodeSession:
        """A new generation's state: an empty cache for ``batch`` rows and ``capacity`` positions."""
        return DecodeSession(self, batch, capacity)

    def cache_size(self, capacity: int) -> int:
        """The compiled step attends over the whole cache: round it up so sizes, and compilations, are few."""
        if self.matvec != "compiled":
            return capacity
        return -(-capacity // CAPACITY_STEP) * CAPACITY_STEP

    def new_cache(self, rows: int, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed K and V caches, one (rows, n_kv, capacity, hd) tensor per layer."""
        shape = (rows, self.arch.n_kv, capacity, self.arch.head_dim)
        with torch.inference_mode():  # cache tensors are inference tensors: one compiled specialisation
            return ([torch.zeros(shape, dtype=self.dtype) for _ in self.layers],
                    [torch.zeros(shape, dtype=self.dtype) for _ in self.layers])

    # --- positions ---------------------------------------------------------------------------------
    def rope_tables(self, n: int) -> None:
        """Make the RoPE tables cover positions ``0 .. n-1`` (grown by replacement, never written in place:
        a concurrent reader keeps tables at least as long as it needs)."""
        with self._lock:
            if self.tables and next(iter(self.tables.values()))[0].shape[0] >= n:
                return
            pos = torch.arange(n).unsqueeze(0)
            x = torch.zeros(1, dtype=self.dtype)
            tables = {}
            with torch.no_grad():
                for name in self.arch.rope_tables:
                    cos, sin = (self.rotary(x, pos, name) if self.arch.model_type == "gemma3_text"
                                else self.rotary(x, pos))
                    tables[name] = (cos[0], sin[0])  # (n, rd)
            self.tables = tables

    def rope_rows(self, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each table's (cos, sin) rows of positions ``pos`` (B | 1, T), shaped (B | 1, 1, T, rd)."""
        return {name: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for name, (cos, sin) in self.tables.items()}

    def masks(self, pos: torch.Tensor, width: int) -> dict[int | None, torch.Tensor]:
        """The attention mask of each distinct window for queries at ``pos`` (B | 1, T) over ``width`` keys."""
        return {w: attention_mask(pos, width, w, self.dtype) for w in self.arch.windows}

    # --- the forward ---------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, H) through the model's own module (Gemma's scales them by sqrt(H) itself)."""
        return self.embed(ids)

    def run(self, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], pos: torch.Tensor,
            rows: torch.Tensor | None, qpos: torch.Tensor, width: int, compiled: bool,
            dynamic_width: bool = False) -> torch.Tensor:
        """Every layer over ``x`` (B, T, H): ``caches`` each layer's (kc, vc) views of ``width`` positions,
        ``pos``/``rows`` where the new K/V go (:func:`~llmcourse.core.runtime.layer.write_cache`), ``qpos``
        (B | 1, T) the queries' positions (RoPE and masks); ``compiled`` runs the compiled layer on the
        compiled weights; ``dynamic_width`` compiles the width as a symbol (the caller marks the caches)."""
        if compiled:
            return self._stack(x, caches, pos, rows, qpos, width, dynamic_width, with_head=False)
        masks = self.masks(qpos, width)
        ropes = self.rope_rows(qpos)
        for lw, kind, (kc, vc) in zip(self.layers, self.arch.layers, caches, strict=True):
            rope = ropes[kind.rope] if kind.rope is not None else None
            x = decoder_layer(x, lw, self.arch, kc, vc, pos, rows, rope, masks[kind.window])
        return x

    def step_logits(self, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], pos: torch.Tensor,
                    rows: torch.Tensor | None, qpos: torch.Tensor, width: int,
                    dynamic_width: bool = False, layers_per_call: int | None = None) -> torch.Tensor:
        """The compiled step of ``x`` (B, T, H) (arguments as :meth:`run`): every layer, the final norm and the
        head, in ``ceil(layers / layers_per_call)`` compiled calls (:attr:`layers_per_call` unless given)
        -> fp32 logits (B, T, V)."""
        return self._stack(x, caches, pos, rows, qpos, width, dynamic_width, with_head=True, per_call=layers_per_call)

    def _stack(self, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], pos: torch.Tensor,
               rows: torch.Tensor | None, qpos: torch.Tensor, width: int, dynamic_width: bool,
               with_head: bool, per_call: int | None = None) -> torch.Tensor:
        """:func:`decode_stack` compiled, over runs of ``per_call`` layers (default :attr:`layers_per_call`); the
        head in the same call when it is the whole stack."""
        masks = self.masks(qpos, width)
        if dynamic_width:
            for m in masks.values():
                mark_dynamic(m, 3)
        ropes = self.rope_rows(qpos)
        rope_t = tuple(ropes[name] for name in self.arch.rope_tables)
        mask_t = tuple(masks[w] for w in self.arch.windows)
        n = len(self.step_layers)
        g = self.layers_per_call if per_call is None else (n if per_call <= 0 else min(per_call, n))
        fused = with_head and g == n  # the head joins a whole-stack call; after runs of layers it is its own
        # what varies between calls (the weights and the model's constants do not): the key of a known call
        common = (pos.shape, None if rows is None else rows.shape, dynamic_width,
                  tuple((m.shape, m.stride()) for m in mask_t), tuple((t.shape, t.stride()) for r in rope_t for t in r))
        for i in range(0, n, g):  # call, which depends on the rows only, not on the window (fewer compilations)
            j = min(n, i + g)
            key = (i, j, fused, x.shape, x.stride(), x.dtype, common, caches[i][0].stride(),
                   tuple(c.shape for kv in caches[i:j] for c in kv))
            x = self._stack_calls(self._stack_fn, key, x, tuple(self.step_layers[i:j]), self.plan[i:j], self.arch,
                                  tuple(caches[i:j]), pos, rows, rope_t, mask_t, self.norm if fused else None,
                                  self.head_step if fused else None)
        if with_head and not fused:
            a = self.arch
            x = self._head_fn(x, self.norm, self.head_step, a.eps, a.final_softcap)
        if with_head:
            self.head_compiled = True
        return x

    def logits(self, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Final norm and output head for a few rows, ``x`` (B, H) -> fp32 logits (B, V) (or a multi-token
        step's (B, T, H) -> (B, T, V)): the compiled head
        once a compiled step has run (one pass over the head in its stored dtype), else eagerly."""
        a = self.arch
        if (compiled or self.head_compiled) and self.matvec == "compiled":
            self.head_compiled = True
            x = x.clone(memory_format=torch.contiguous_format)  # one layout (strides), one specialisation
            with compile_settings():
                return self._head_fn(x, self.norm, self.head_step, a.eps, a.final_softcap)
        return head(x, self.norm, self.head_eager, a.eps, a.final_softcap)

    @torch.inference_mode()
    def forward(self, state: DecodeSession, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` (B, T) at ``state``'s next T positions; return the last position's logits (B, V) fp32,
        or with ``all_logits`` every position's (B, T, V) (a multi-token step: verifying T drafted tokens
        in one forward). Rolling back is setting ``state.pos`` back: later writes overwrite the cache."""
        b, t = ids.shape
        p0 = state.pos
        if p0 + t > state.capacity:
            raise ValueError(f"KV cache holds {state.capacity} positions, asked for {p0 + t}")
        if all_logits:
            width = self.verify_width(t)
            if self.matvec == "compiled" and self.multi_ok and 1 < t and p0 + width <= state.capacity:
                return self._compiled(state, ids, width)
            return self._forward_eager(state, ids, all_logits=True)
        if self.matvec == "compiled" and (t == 1 or t <= self.step_prompt):
            logits = None
            for j in range(t):  # a short prompt of a model with packed codes: one compiled step per token
                logits = self._compiled_step(state, ids[:, j])
            return logits
        return self._forward_eager(state, ids)

    @staticmethod
    def verify_width(t: int) -> int:
        """The compiled multi-token step's width for ``t`` tokens: ``t`` rounded up to a bucket of
        :data:`VERIFY_WIDTHS` (one compilation per bucket and cache size), or ``t`` itself beyond them."""
        return next((w for w in VERIFY_WIDTHS if w >= t), t)

    def _forward_eager(self, state: DecodeSession, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        t, p0 = ids.shape[1], state.pos
        pos = torch.arange(p0, p0 + t)
        w = p0 + t  # eagerly, attend over the used positions only
        caches = [(k[:, :, :w], v[:, :, :w]) for k, v in zip(state.k_cache, state.v_cache, strict=True)]
        x = self.run(self.embed_ids(ids), caches, pos, None, pos.view(1, t), w, compiled=False)
        state.pos = p0 + t
        if all_logits:
            a = self.arch
            return head(x, self.norm, self.head_eager, a.eps, a.final_softcap)
        return self.logits(x[:, -1])

    @torch.inference_mode()
    def warmup(self, rows: int, capacity: int, tokens: int = 1) -> None:
        """Compile the step for ``rows`` x ``capacity`` now (a no-op when done, or on the eager path); with
        ``tokens`` > 1, the multi-token step that verifies that many tokens (:meth:`verify_width`) too."""
        cap = self.cache_size(capacity)
        keys = [(rows, cap)] + ([(rows, cap, self.verify_width(tokens))] if tokens > 1 else [])
        if self.matvec != "compiled" or all(k in self._warm for k in keys):
            return
        s = self.session(rows, capacity)  # a throw-away session: no generation's state is touched
        s.pos = 1
        s.forward(torch.zeros(rows, 1, dtype=torch.long))
        if tokens > 1 and self.matvec == "compiled":
            s.pos = 1
            s.forward(torch.zeros(rows, tokens, dtype=torch.long), all_logits=True)

    def _compiled_step(self, state: DecodeSession, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through the compiled layer and head (the first run of a shape compiles)."""
        return self._compiled(state, tokens.view(-1, 1), 0)

    def _compiled(self, state: DecodeSession, ids: torch.Tensor, width: int) -> torch.Tensor:
        """``ids`` (B, T) through the compiled layer and head: one token per row (``width`` 0; logits (B, V)),
        or a multi-token step of ``width`` >= T positions (logits (B, T, V)). The first run of a shape
        compiles, in one thread at a time; if compiling fails the model falls back to its eager path."""
        key = (ids.shape[0], state.capacity) if not width else (ids.shape[0], state.capacity, width)
        if key in self._warm:
            return self._run_compiled(state, ids, width)
        with self._lock:  # the first run of a shape compiles: one thread at a time
            if self.matvec != "compiled":  # another thread found that compiling fails
                return self.forward(state, ids, all_logits=bool(width))
            try:
                logits = self._run_compiled(state, ids, width)
            except Exception as exc:  # no working compiler, or an Inductor failure: stay correct, run eagerly
                if width and self._warm:  # the one-token step works: only multi-token steps run eagerly
                    log.warning("torch.compile failed for the multi-token step (%s); it runs eagerly",
                                type(exc).__name__)
                    self.multi_ok = False
                    return self._forward_eager(state, ids, all_logits=True)
                if self._warm:  # it compiled and ran before: this is a real error
                    raise
                log.warning("torch.compile failed (%s: %s); decoding eagerly, which is slower",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.matvec = "eager"  # the eager weights from now on
                return self.forward(state, ids, all_logits=bool(width))
            self._warm.add(key)
            return logits

    def _run_compiled(self, state: DecodeSession, ids: torch.Tensor, width: int) -> torch.Tensor:
        """The compiled forward of ``ids`` (B, T) at ``state.pos``. A multi-token step pads the tokens to
        ``width`` positions (repeating the last): the padding's keys land past the new position, where the
        causal mask hides them from every real query and the next forward overwrites them."""
        b, t = ids.shape
        p = state.pos
        n = max(width, 1)
        if n > t:
            ids = torch.cat([ids, ids[:, -1:].expand(b, n - t)], dim=1)
        pos = torch.arange(p, p + n)
        caches = list(zip(state.k_cache, state.v_cache, strict=True))
        with compile_settings():
            logits = self.step_logits(self.embed_ids(ids), caches, pos, None, pos.view(1, n), state.capacity)
        logits = logits[:, 0] if not width else logits[:, :t]
        state.pos = p + t
        return logits


class DecodeSession:
    """One generation's state on a :class:`FastModel`: its static KV cache and position.

    ``session = fast.session(rows, capacity)``, then :meth:`prefill` once with the prompt and :meth:`step`
    per new token; :meth:`expand` and :meth:`reorder` serve beam search. Sessions never share tensors, so
    concurrent sessions on one model do not interfere.
    """

    def __init__(self, fast: FastModel, batch: int, capacity: int) -> None:
        self.fast = fast
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.pos = 0
        self.capacity = 0
        self.reset(batch, capacity)

    def reset(self, batch: int, capacity: int) -> None:
        """Allocate an empty cache for ``batch`` rows and at least ``capacity`` positions."""
        capacity = self.fast.cache_size(capacity)
        self.k_cache, self.v_cache = self.fast.new_cache(batch, capacity)
        self.pos, self.capacity = 0, capacity
        self.fast.rope_tables(capacity)

    @property
    def rows(self) -> int:
        return self.k_cache[0].shape[0] if self.k_cache else 0

    @torch.inference_mode()
    def expand(self, n: int) -> None:
        """Repeat a one-row cache into ``n`` rows (beam search after the prompt)."""
        self.k_cache = [k.expand(n, -1, -1, -1).contiguous() for k in self.k_cache]
        self.v_cache = [v.expand(n, -1, -1, -1).contiguous() for v in self.v_cache]

    @torch.inference_mode()
    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (B,), in that order (beam search)."""
        if torch.equal(rows, torch.arange(rows.shape[0])):
            return
        self.k_cache = [k.index_select(0, rows) for k in self.k_cache]
        self.v_cache = [v.index_select(0, rows) for v in self.v_cache]

    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` (B, T) at the next T positions; return the last position's logits (B, V) in fp32, or
        every position's (B, T, V) with ``all_logits``."""
        return self.fast.forward(self, ids, all_logits)

    def rollback(self, pos: int) -> None:
        """Forget the positions from ``pos`` on (rejected draft tokens): the next forward overwrites them."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot roll back to position {pos} from {self.pos}")
        self.pos = pos

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) from position 0."""
        self.pos = 0
        return self.forward(ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> logits (B, V)."""
        return self.forward(tokens.view(-1, 1))


_LOCK = threading.Lock()


class _Held(dict):
    """A model's runtimes (matvec -> (signature, FastModel)); a copy of the model starts without them."""

    def __deepcopy__(self, memo: dict) -> _Held:
        return _Held()

    def __reduce__(self) -> tuple:
        return (_Held, ())


def _signature(model: Any) -> tuple:
    """Changes when a module is swapped or a weight replaced, so a held FastModel is not stale."""
    return tuple((type(m).__name__, id(m), *(p.data_ptr() for p in m.parameters(recurse=False)))
                 for m in model.modules())


def runtime_for(model: Any, matvec: str = "auto") -> FastModel:
    """The :class:`FastModel` of ``model``, built once per step path and held by the model itself
    (``model._llmcourse_runtime``), rebuilt when a module is swapped or a weight replaced."""
    if matvec == "auto":
        matvec = auto_matvec(model)
    sig = _signature(model)
    with _LOCK:  # two threads preparing one model build it once
        held = model.__dict__.setdefault("_llmcourse_runtime", _Held())
        hit = held.get(matvec)
        if hit is not None and hit[0] == sig:
            return hit[1]
        fast = FastModel(model, matvec=matvec)
        held[matvec] = (sig, fast)
        return fast


def held_runtime(model: Any, matvec: str) -> FastModel | None:
    """The :class:`FastModel` that :func:`runtime_for` holds for ``model`` and ``matvec``, if still current."""
    hit = model.__dict__.get("_llmcourse_runtime", {}).get(matvec)
    return hit[1] if hit is not None and hit[0] == _signature(model) else None
