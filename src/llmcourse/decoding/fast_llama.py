"""A lean Llama-family forward for CPU decoding: static KV cache, compiled layers, little Python.

Same maths as transformers' ``LlamaForCausalLM`` (Touvron et al. 2023, "LLaMA"), written for
one-token steps:

    h = x + W_o · attn(RoPE(W_q · n1(x)), RoPE(W_k · n1(x)), W_v · n1(x))
    y = h + W_down · (silu(W_gate · n2(h)) * (W_up · n2(h)))
    n(x) = w * x / sqrt(mean(x^2) + eps)                        (RMSNorm, Zhang & Sennrich 2019)
    RoPE(q)_t = q * cos(t * theta) + rotate_half(q) * sin(t * theta)   (Su et al. 2021)
    attn(q, K, V) = softmax(q K^T / sqrt(d)) V, grouped-query: each of the n_kv key/value
                    heads serves n_heads / n_kv query heads (Ainslie et al. 2023, GQA)

Two ways to run a decode step (one new token per row), chosen by ``matvec``:

- ``compiled`` (the default for models of 32 MB and more, "auto"): each layer is one call of
  :func:`decode_layer`, compiled by TorchInductor into C++ loops. A product with a weight is
  written as a reduction (:func:`rows_dot`), which Inductor turns into one row-parallel pass
  over the weight — decoding one token is bound by reading every weight once — and the norms,
  RoPE, the cache write and attention fuse into a few loops around it. Several rows (beams)
  share each weight tile while it is in cache. The KV cache is a static tensor; attention runs
  over all of it with a mask, so each cache size (rounded up to 64) compiles once.
- ``mm`` (no compiler needed): eager PyTorch, ~20 operations per layer, reading the model's own
  weights in their (out, in) layout through :func:`matvec` (a chunked ``torch.bmm``): a one-row
  ``F.linear`` runs on one core at half the bandwidth (shared/MACHINE.md), and a transposed copy
  of every weight would double the memory.

Prompts (prefill) always run eagerly: many rows make the products compute-bound, where
``F.linear``'s GEMM is the right tool.

Weights are shared, state is per call: a :class:`FastLlama` holds only the model's tensors (read,
never written); each generation opens its own :class:`DecodeSession` (KV cache, position), so
several generations may run on one model at once, from several threads.

Plug-in rule (:class:`DecodePlugin`, for the quantization labs): a projection is either a plain
``nn.Linear`` or a module whose ``decode_parts()`` returns :data:`Parts` ``(codes, scale, zero, bias)``;
the compiled step then de-quantizes inside its loads, reading the codes once: one byte per weight (read
four at a time as 32-bit words on CPUs without AVX-512: :func:`byte_dot`), or 2/4/8-bit codes packed in
32-bit words (:func:`packed_dot`; half a byte per 4-bit weight). Any other module
(e.g. LLM.int8()) is called as ``module(x)`` on the ``mm`` path, so a model whose linears were
swapped still runs here.

Supported: ``model_type`` in :data:`SUPPORTED` (Llama, Qwen2 — q/k/v biases are handled; Mistral
without a sliding window). Logits match transformers within 1e-4 absolute in fp32 on both paths
(tested): the products sum in a different order, so they are not bit-identical.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.core.threads import slow_byte_loads

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "mistral")


MATVECS = ("auto", "compiled", "mm")
SMALL_BATCH = 8  # up to this many rows (beams) run as one-row products on the eager "mm" path
TILE = 16  # output rows per tile of the compiled several-row product (see rows_dot)
CAPACITY_STEP = 64  # the compiled step's KV cache grows in these steps (one compilation per size)
AUTO_MIN_BYTES = 32 * 2**20  # "auto" compiles the step for models with at least this many weight bytes
STEP_PROMPT = 6  # prompts up to this long run as one-token compiled steps on models with packed codes


class Projection:
    """``y = x W^T + b`` on the eager path, with the modules' own weights (no copies): plain ``nn.Linear``
    modules through :func:`matvec`, any other module as ``module(x)``.

    ``fuse=True`` reads the ``nn.Linear`` weights in place, in their usual (out, in) layout;
    ``fuse=False`` calls the modules themselves (``F.linear`` for an ``nn.Linear``; its own kernel
    for a swapped module such as the 8-bit lab's ``Int8Linear``). Several modules (q, k, v) return
    one output each.
    """

    def __init__(self, modules: list[nn.Module], fuse: bool = True) -> None:
        self.fused = fuse and all(type(m) is nn.Linear for m in modules)
        self.sizes = [getattr(m, "out_features", None) for m in modules]
        self.modules = modules
        # references to the modules' tensors, never copies: the session holds one layout of each weight
        self.weights = [m.weight.detach() for m in modules] if self.fused else []
        self.biases = [None if m.bias is None else m.bias.detach() for m in modules] if self.fused else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.fused:
            outs = [m(x) for m in self.modules]
        else:
            outs = [matvec(w, x) if b is None else matvec(w, x) + b
                    for w, b in zip(self.weights, self.biases, strict=True)]
        return outs[0] if len(outs) == 1 else outs


MATVEC_CHUNKS = 8  # a few-row product splits W's output rows into this many batches (see matvec)


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` with ``W`` (O, I) in its usual layout: ``x`` (..., I) -> (..., O).

    For one to :data:`SMALL_BATCH` rows, ``W`` is viewed as ``MATVEC_CHUNKS`` stacked (O/8, I) blocks
    and multiplied by ``torch.bmm``: here that runs at the bandwidth of ``x @ W^T`` with ``W^T``
    stored transposed (``F.linear`` for one row reads (O, I) at half that, shared/MACHINE.md), so no
    transposed copy of the weights is needed. More rows (a prompt) take ``F.linear``'s GEMM.
    """
    o, i = w.shape
    rows = x.reshape(-1, i)
    b = rows.shape[0]
    if b > SMALL_BATCH or o % MATVEC_CHUNKS or not w.is_contiguous():
        return F.linear(x, w)
    y = torch.bmm(w.view(MATVEC_CHUNKS, o // MATVEC_CHUNKS, i), rows.t().expand(MATVEC_CHUNKS, i, b))
    y = y.reshape(o, b).t()  # (B, O)
    return (y if b == 1 else y.contiguous()).view(*x.shape[:-1], o)


# --- the compiled decode step ------------------------------------------------------------------
# One new token per row. Each function below is compiled by TorchInductor into a handful of C++
# loops: a product with a weight becomes one pass over that weight (the bound of a decode step is
# reading every weight once), the norms, RoPE and attention become a few fused loops, and a layer
# costs one Python call instead of ~15 tensor operations.

def rows_dot(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` for a few rows: ``x`` (B, I), ``w`` (O, I) -> (B, O), written as a reduction.

    One row: ``y_o = sum_i w_oi x_i``, which Inductor runs as a row-parallel streaming pass over ``w``.
    Several rows (beams): the outputs are taken in tiles of ``TILE`` weight rows and every row of
    ``x`` meets a tile while it is in cache, so ``w`` is still read from memory once per step
    (B = 4 costs 1.6x one row, not 4x).
    """
    b = x.shape[0]
    o, i = w.shape
    if b == 1 or o % TILE:
        return (x.unsqueeze(1) * w.unsqueeze(0)).sum(-1)
    part = (w.view(o // TILE, 1, TILE, i) * x.view(1, b, 1, i)).sum(-1)  # (O/T, B, T)
    return part.permute(1, 0, 2).reshape(b, o)


Parts = tuple
"""What the compiled step reads of one projection: ``(weight, scale, zero, bias)``.

* a float layer: ``(W (O, I), None, None, bias (O,) | None)``;
* integer codes with one scale per output row: ``(q (O, I) int8/uint8, 1/s (O, 1), z (O, 1) | None, bias)``,
  ``W = (q - z) / s`` (the 8-bit lab's weight-only int8);
* integer codes with a scale per group of ``I / G`` consecutive inputs: ``(q (O, I), scale (O, G),
  zero (O, G) | None, bias)`` with G > 1, ``W[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]``,
  ``g = i // (I / G)`` (3-bit GPTQ, codes unpacked to one byte each);
* unsigned codes of ``bits`` in {2, 4, 8} *packed* ``c = 32 / bits`` to a 32-bit word: ``(words (O, I / c),
  scale (O, G), zero (O, G) | None, bias)``, G >= 1, the same ``W`` with ``q`` read from the words
  (:func:`packed_dot`: 2/4/8-bit GPTQ, one read of the packed weight per token). The words are int32
  bit patterns held in a float32 tensor (:func:`pack_words`), told from a float weight by their width
  ``I / c``.
"""

PACKED_BITS = (2, 4, 8)  # code widths that fill an int32 word exactly (32 / bits codes per word)


def pack_words(codes: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (O, I) of ``bits`` bits into 32-bit words (O, I / c), ``c = 32 / bits``, in the
    layout :func:`packed_dot` reads: within each of ``groups`` runs of ``s = I / groups`` inputs, word ``j``
    holds the codes of inputs ``j + k s / c`` (k = 0 .. c-1) at bits ``[k·bits, (k+1)·bits)``. So a vector of
    consecutive words meets a vector of consecutive inputs for every ``k``: the compiled loop loads whole
    words and whole input vectors, never single bytes.

    The int32 words are returned as a float32 *view* of the same bits (:func:`packed_dot` views them back):
    TorchInductor loads a float32 vector with one instruction, but an int8 or int32 vector through a
    stack copy on AVX2 CPUs — measured here, 106 M 4-bit weights took 17 ms as int32 words, 5.9 ms as
    float32 bits, 18 ms as fp32 weights."""
    o, i = codes.shape
    c = 32 // bits
    sw = i // groups // c
    parts = codes.to(torch.int32).view(o, groups, c, sw)
    words = torch.zeros(o, groups, sw, dtype=torch.int32)
    for k in range(c):
        words |= parts[:, :, k] << (bits * k)
    return words.view(o, groups * sw).view(torch.float32)


def unpack_words(words: torch.Tensor, inputs: int, groups: int) -> torch.Tensor:
    """The codes (O, I) int32 of :func:`pack_words`' words (its exact inverse)."""
    words = words.view(torch.int32)
    o, n = words.shape
    c = inputs // n
    bits = 32 // c
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, 1, c, 1)
    return ((words.view(o, groups, 1, n // groups) >> shifts) & ((1 << bits) - 1)).view(o, inputs)


def dequantize_words(words: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The weight (O, I) in ``scale``'s dtype, ``W[o, i] = (q[o, i] - zero[o, g]) · scale[o, g]``, of ``bits``-bit
    codes packed by :func:`pack_words` (a prompt's products use it: many rows make them compute-bound, where
    F.linear's GEMM is the tool). Compiled when a C++ compiler is there: one pass that reads the words and
    writes W (the eager unpacking makes four passes over W-sized tensors)."""
    fn = compiled("dequantize_words") if can_compile() else _dequantize_words
    try:
        return fn(words, bits, scale, zero)
    except Exception as exc:  # an Inductor failure: stay correct, unpack eagerly from now on
        if fn is _dequantize_words:
            raise
        log.warning("torch.compile failed for the de-quantization (%s); unpacking eagerly", type(exc).__name__)
        _COMPILED["dequantize_words"] = _dequantize_words
        return _dequantize_words(words, bits, scale, zero)


def _dequantize_words(words: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    o, groups = scale.shape
    q = unpack_words(words, words.shape[-1] * (32 // bits), groups).view(o, groups, -1).to(scale.dtype)
    if zero is not None:
        q = q - zero.unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).view(o, -1)


def packed_dot(words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` for ``W[o, i] = (q[o, i] - zero[o, g]) · scale[o, g]`` with the codes ``q`` packed in 32-bit
    words (:func:`pack_words`): ``x`` (B, I) -> (B, O).

    Per group, ``y_o = Σ_g scale_og (Σ_{i∈g} q_oi x_i - zero_og Σ_{i∈g} x_i)``. The inner sums take each
    code out of its word with a shift and a mask and meet it with ``x``: one read of the packed weight,
    two integer operations, a conversion and a multiply-add per weight. Word ``j`` of group ``g`` yields
    ``a_gj = Σ_k q_k x_k`` over its ``c`` codes; the scale and zero point then enter once per word,
    ``y_o = Σ_{g,j} (scale_og a_gj - zero_og scale_og Σ_k x_k)``, so the whole row is one reduction
    over whole vectors (no ragged tail of groups). Several rows share each tile of ``TILE`` weight rows while it is in cache, as in :func:`rows_dot`.
    """
    b, i = x.shape
    words = words.view(torch.int32)  # the float32 bits of pack_words (a free reinterpretation)
    o, n = words.shape
    c = i // n
    bits = 32 // c
    g = scale.shape[-1]
    sw = n // g  # words per group
    mask = (1 << bits) - 1
    xg = x.view(b, g, c, sw)
    tiled = b > 1 and o % TILE == 0
    w = words.view(o // TILE, 1, TILE, g, sw) if tiled else words.view(1, o, g, sw)
    acc = None
    for k in range(c):
        xk = xg[:, :, k].view(1, b, 1, g, sw) if tiled else xg[:, :, k].unsqueeze(1)
        term = ((w >> (bits * k)) & mask).to(x.dtype) * xk
        acc = term if acc is None else acc + term
    # (O/T, B, T, G, sw) or (B, O, G, sw); scale and zero (O, G) broadcast over the words of a group
    sc = scale.view(o // TILE, 1, TILE, g, 1) if tiled else scale.view(1, o, g, 1)
    acc = acc * sc
    if zero is not None:
        xsum = xg.sum(2)  # (B, G, sw): Σ_k x over the codes of each word
        zs = (zero * scale).view(sc.shape)
        acc = acc - zs * (xsum.view(1, b, 1, g, sw) if tiled else xsum.unsqueeze(1))
    y = acc.sum((-2, -1))
    return y.permute(1, 0, 2).reshape(b, o) if tiled else y


# One-byte codes read four at a time. On a CPU without AVX-512, TorchInductor loads an int8 (or
# int32) vector through a stack copy, 8 bytes at a time, which made the 8-bit lab's weight-only step
# 4-5x *slower* than fp32 here (118-131 ms per token of the default model against 27-30 ms). There
# the codes' own bytes are read as float32 words instead (a free reinterpretation, no copy) and taken
# apart with shifts (:func:`byte_dot`); on AVX-512 CPUs the plain one-byte loads are fast and stay.
READ_BYTES_AS_WORDS = slow_byte_loads()


@torch.library.custom_op("llmcourse::quads", mutates_args=())
def quads(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, I) regrouped as (B, 4, I/4): row ``k`` holds inputs ``k, 4 + k, 8 + k, ...``, the inputs
    that meet byte ``k`` of each 4-byte word in :func:`byte_dot`. A custom op, so that the compiled step
    writes it once as a buffer (TorchInductor would otherwise read ``x`` with stride 4 inside the
    weight's loop: 4x slower)."""
    b, i = x.shape
    return x.view(b, i // 4, 4).transpose(1, 2).contiguous()


@quads.register_fake
def _quads_shape(x: torch.Tensor) -> torch.Tensor:
    b, i = x.shape
    return x.new_empty(b, 4, i // 4)


def byte_dot(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x Qᵀ`` for one-byte codes ``Q`` (O, I) int8 or uint8, read as 4-byte words: ``x`` (B, I) -> (B, O).

    Word ``j`` of a row holds the codes of inputs ``4j .. 4j+3`` (byte ``k`` at bits ``8k``, little
    endian); code ``k`` is sign-extended with two shifts (``(w << 24 - 8k) >> 24``, int8) or taken with a
    shift and a mask (uint8), converted and multiplied by ``x[4j + k]`` (:func:`quads`). Several rows
    share each tile of ``TILE`` weight rows, as in :func:`rows_dot`."""
    b, i = x.shape
    o = codes.shape[0]
    words = codes.view(torch.float32).view(torch.int32)  # (O, I/4), the same bytes
    xq = quads(x)  # (B, 4, I/4)
    tiled = b > 1 and o % TILE == 0
    w = words.view(o // TILE, 1, TILE, i // 4) if tiled else words.unsqueeze(0)
    acc = None
    for k in range(4):
        q = (w << (24 - 8 * k)) >> 24 if codes.dtype == torch.int8 else (w >> (8 * k)) & 0xFF
        xk = xq[:, k].view(1, b, 1, i // 4) if tiled else xq[:, k].unsqueeze(1)
        term = q.to(x.dtype) * xk
        acc = term if acc is None else acc + term
    y = acc.sum(-1)  # (O/T, B, T) or (B, O)
    return y.permute(1, 0, 2).reshape(b, o) if tiled else y


def reads_bytes_as_words(w: torch.Tensor) -> bool:
    """Whether :func:`project` runs one-byte codes ``w`` through :func:`byte_dot` on this CPU."""
    return (READ_BYTES_AS_WORDS and w.dtype in (torch.int8, torch.uint8) and w.shape[-1] % 4 == 0
            and w.is_contiguous())


@runtime_checkable
class DecodePlugin(Protocol):
    """A module that replaces an ``nn.Linear`` and offers its weights to the compiled decode step."""

    def decode_parts(self) -> Parts | None:
        """The :data:`Parts` of this projection, or None to be called as ``module(x)`` on the eager path."""
        ...


def is_packed(parts: Parts, inputs: int) -> bool:
    """Whether ``parts`` hold codes packed in words (:func:`pack_words`) for a projection of ``inputs`` inputs:
    quantized (a scale) and narrower than the input."""
    return parts[1] is not None and parts[0].shape[-1] < inputs


def project(parts: Parts, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` for one projection's parts (:data:`Parts`). Float weights are used as they are;
    integer codes are de-quantized inside the product's loads, ``y_o = (sum_i (q_oi - z_o) x_i) / s_o``
    for per-row scales, so one byte per weight is read from memory."""
    w, scale, zero, bias = parts
    if is_packed(parts, x.shape[-1]):  # codes packed in words: de-quantized per group
        y = packed_dot(w, scale, zero, x)
        return y if bias is None else y + bias
    if scale is not None and scale.shape[-1] > 1:  # per-group scales: de-quantize inside the loads
        o, i = w.shape
        g = scale.shape[-1]
        wq = w.to(x.dtype).view(o, g, i // g)
        if zero is not None:
            wq = wq - zero.unsqueeze(-1)
        w = (wq * scale.unsqueeze(-1)).view(o, i)
        scale = None
    elif scale is not None and reads_bytes_as_words(w):  # y = (x Qᵀ - z Σx) / s
        y = byte_dot(w, x)
        if zero is not None:
            y = y - zero.view(1, -1) * x.sum(-1, keepdim=True)
        y = y * scale.view(1, -1)
        return y if bias is None else y + bias
    elif scale is not None:
        w = w.to(x.dtype) if zero is None else w.to(x.dtype) - zero
    y = rows_dot(w, x)
    if scale is not None:
        y = y * scale.view(1, -1)
    return y if bias is None else y + bias


def decode_layer(x: torch.Tensor, wts: tuple, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, *, n_heads: int, n_kv: int,
                 head_dim: int, eps: float) -> torch.Tensor:
    """One decoder layer for one new token per row: ``x`` (B, H) -> (B, H); writes K/V at ``pos`` in place.

    ``mask`` (C,) is 0 for cache positions <= pos and -inf after, so the attention runs over the
    whole (static-size) cache and compiles once per cache size.
    """
    n1, q_proj, k_proj, v_proj, o_proj, n2, gate_proj, up_proj, down_proj = wts
    b = x.shape[0]
    h = rms_norm(x, n1, eps)
    q = project(q_proj, h).view(b, n_heads, head_dim)
    k = project(k_proj, h).view(b, n_kv, head_dim)
    v = project(v_proj, h).view(b, n_kv, head_dim)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    kc.index_copy_(2, pos, k.unsqueeze(2))  # (B, n_kv, C, hd)
    vc.index_copy_(2, pos, v.unsqueeze(2))
    qg = q.view(b, n_kv, n_heads // n_kv, 1, head_dim)  # grouped-query: g query heads per K/V head
    s = (qg * kc.unsqueeze(2)).sum(-1) * head_dim ** -0.5 + mask  # (B, n_kv, g, C)
    att = torch.softmax(s, dim=-1)
    y = (att.unsqueeze(-1) * vc.unsqueeze(2)).sum(-2).reshape(b, n_heads * head_dim)
    x = x + project(o_proj, y)
    h = rms_norm(x, n2, eps)
    return x + project(down_proj, F.silu(project(gate_proj, h)) * project(up_proj, h))


def decode_head(x: torch.Tensor, norm: torch.Tensor, head: Parts, eps: float) -> torch.Tensor:
    """Final norm and output head: (B, H) -> fp32 logits (B, V)."""
    return project(head, rms_norm(x, norm, eps)).float()


_COMPILED: dict[str, Any] = {}

# Inductor checks each input's sizes and strides again in Python on every call (assert_size_stride);
# Dynamo's guards already check them (dynamic=False), and with ~30 inputs per layer the re-checks cost
# ~5 ms of a 4-bit step of ~17 ms (30 layer calls; measured on this 2-core machine). And it inlines a
# normed activation used by several products into each of them, recomputing ``x · rsqrt · w`` for every
# weight row; realizing it once (a threshold of 1 read) took the 4-bit step from ~16.5 to ~14.5 ms
# (fp32, bound by reading its weights, is unchanged).
COMPILE_OPTIONS = {"size_asserts": False, "realize_reads_threshold": 1}


def allow_specialisations() -> None:
    """Raise Dynamo's recompile limits in the calling thread: one specialisation per shape is the design
    (weight shapes, rows, buckets, cache windows, models in one process). Dynamo's config is per thread,
    so every thread that runs a compiled step (a server's scheduler) must raise them, not only the one
    that compiled first."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < 1024:
        dynamo_config.recompile_limit = 1024
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8192)


def compiled(name: str) -> Any:
    """The ``torch.compile``'d :func:`decode_layer`, :func:`decode_head` or the words' de-quantization
    (shape-specialised, cached on disk)."""
    allow_specialisations()
    if name not in _COMPILED:
        fn = {"layer": decode_layer, "head": decode_head, "dequantize_words": _dequantize_words}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
    return _COMPILED[name]


def can_compile() -> bool:
    """Whether TorchInductor can build CPU kernels here (it needs a C++ compiler)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@dataclass
class Layer:
    n1: torch.Tensor  # input RMSNorm weight (H,)
    qkv: Projection
    o: Projection
    n2: torch.Tensor  # post-attention RMSNorm weight (H,)
    gate_up: Projection
    down: Projection


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (the variance in fp32)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for ``x = (x1, x2)`` along the last dimension (RoPE's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeSession:
    """One generation's state on a :class:`FastLlama`: its static KV cache and position.

    ``session = fast.session(rows, capacity)``, then :meth:`prefill` once with the prompt and
    :meth:`step` per new token; :meth:`expand` and :meth:`reorder` serve beam search. Sessions
    never share tensors, so concurrent sessions on one model do not interfere.
    """

    def __init__(self, fast: FastLlama, batch: int, capacity: int) -> None:
        self.fast = fast
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.pos = 0
        self.capacity = 0
        self.reset(batch, capacity)

    @torch.inference_mode()  # cache tensors are always inference tensors: one compiled specialisation
    def reset(self, batch: int, capacity: int) -> None:
        """Allocate an empty cache for ``batch`` rows and at least ``capacity`` positions."""
        f = self.fast
        capacity = f._cache_size(capacity)
        shape = (batch, f.n_kv, capacity, f.head_dim)  # (B, n_kv, C, hd)
        self.k_cache = [torch.zeros(shape, dtype=f.dtype) for _ in f.layers]
        self.v_cache = [torch.zeros(shape, dtype=f.dtype) for _ in f.layers]
        self.pos, self.capacity = 0, capacity
        f._rope_tables(capacity)

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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (B, T) at the next T positions; return the last position's logits (B, V) in fp32."""
        return self.fast.forward(self, ids)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) from position 0 (the cache is cleared first)."""
        self.pos = 0
        return self.forward(ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> logits (B, V)."""
        return self.forward(tokens.view(-1, 1))


class FastLlama:
    """Our forward of a Llama-family HF model with a static KV cache (see module docstring).

    Holds the weights only (the HF model's own tensors, never copies; the HF model is not modified). State lives in a :class:`DecodeSession`: ``s = fast.session(rows, capacity)``,
    ``s.prefill(prompt)``, ``s.step(tokens)``.
    """

    def __init__(self, model: nn.Module, matvec: str = "auto") -> None:
        if matvec not in MATVECS:
            raise ValueError(f"matvec must be one of {MATVECS}, not {matvec!r}")
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise ValueError(f"FastLlama supports {SUPPORTED}, not {getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by FastLlama")
        self.config = cfg
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens
        # the norms' dtype, not the embedding's: reading ``.weight`` of a swapped embedding (the
        # 8-bit lab's Int8Embedding) would de-quantize the whole table
        self.dtype = inner.norm.weight.dtype
        if matvec == "auto":
            matvec = auto_matvec(model)
        elif matvec == "compiled" and not compilable(model):
            log.info("some projections have no compiled form: FastLlama runs them eagerly (matvec 'mm')")
            matvec = "mm"
        self.matvec = matvec
        fuse = matvec == "mm"  # matvec() on the nn.Linear weights; the compiled step reads them itself
        self.layers = []
        self.step_weights: list[tuple] = []  # per layer, the tensors decode_layer reads
        packed = False  # whether some projection hands over codes packed in words
        for blk in inner.layers:
            a, m = blk.self_attn, blk.mlp
            self.layers.append(Layer(
                n1=blk.input_layernorm.weight.detach(),
                qkv=Projection([a.q_proj, a.k_proj, a.v_proj], fuse), o=Projection([a.o_proj], fuse),
                n2=blk.post_attention_layernorm.weight.detach(),
                gate_up=Projection([m.gate_proj, m.up_proj], fuse), down=Projection([m.down_proj], fuse)))
            if matvec == "compiled":
                # the modules' own tensors, no copies: Inductor fuses the products that share an input
                mods = layer_projections(blk)
                q, k, v, o, gate, up, down = parts = [linear_parts(p) for p in mods]
                packed = packed or any(is_packed(pt, m.in_features) for pt, m in zip(parts, mods, strict=True))
                self.step_weights.append((blk.input_layernorm.weight.detach(), q, k, v, o,
                                          blk.post_attention_layernorm.weight.detach(), gate, up, down))
        self.norm = inner.norm.weight.detach()
        # A prompt's eager forward de-quantizes every packed layer (writes and reads a float weight); a
        # one-token step reads only the packed codes. Prompts of up to STEP_PROMPT tokens of such a
        # model run as steps: 4 tokens of the 4-bit default model in ~70 ms instead of ~110 ms.
        self.step_prompt = STEP_PROMPT if packed else 0
        self.lm_head = Projection([model.lm_head], fuse)
        self.head_parts = linear_parts(model.lm_head) if matvec == "compiled" else None
        self.rotary = inner.rotary_emb
        self.cos = self.sin = None  # (L, head_dim) tables, grown on demand (replaced, never written)
        self._warm: set[tuple[int, int]] = set()  # (rows, capacity) shapes the compiled step has run
        self.head_compiled = False  # whether the compiled decode_head has run (a step of either session kind)
        self._lock = threading.Lock()  # compiling (first run of a shape) happens in one thread at a time

    @property
    def warm(self) -> bool:
        """Whether the compiled step has run (for some shape): using it again costs no compilation."""
        return bool(self._warm)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def session(self, batch: int, capacity: int) -> DecodeSession:
        """A new generation's state: an empty cache for ``batch`` rows and ``capacity`` positions."""
        return DecodeSession(self, batch, capacity)

    # --- cache ---------------------------------------------------------------------------------
    def _rope_tables(self, n: int) -> None:
        with self._lock:
            if self.cos is not None and self.cos.shape[0] >= n:
                return
            pos = torch.arange(n).unsqueeze(0)
            with torch.no_grad():
                cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype), pos)
            # one assignment each, of new tensors: a concurrent reader keeps tables at least as long as it needs
            self.sin = sin[0]
            self.cos = cos[0]  # (n, head_dim)

    def _cache_size(self, capacity: int) -> int:
        """The compiled step attends over the whole cache: round it up so sizes, and compilations, are few."""
        if self.matvec != "compiled":
            return capacity
        return -(-capacity // CAPACITY_STEP) * CAPACITY_STEP

    @torch.inference_mode()
    def warmup(self, rows: int, capacity: int) -> None:
        """Compile the step for ``rows`` x ``capacity`` now (a no-op when done, or on the eager path).

        Compiling takes seconds the first time in a process (less with Inductor's on-disk cache);
        :func:`~llmcourse.decoding.engine.generate` calls this before it starts its clock.
        """
        key = (rows, self._cache_size(capacity))
        if self.matvec != "compiled" or key in self._warm:
            return
        s = self.session(rows, capacity)  # a throw-away session: no generation's state is touched
        s.pos = 1
        s.forward(torch.zeros(rows, 1, dtype=torch.long))

    # --- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, state: DecodeSession, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (B, T) at ``state``'s next T positions; return the last position's logits (B, V) in fp32."""
        b, t = ids.shape
        p0 = state.pos
        if p0 + t > state.capacity:
            raise ValueError(f"KV cache holds {state.capacity} positions, asked for {p0 + t}")
        if self.matvec == "compiled" and (t == 1 or t <= self.step_prompt):
            logits = None
            for j in range(t):  # a short prompt of a model with packed codes: one compiled step per token
                logits = self._compiled_step(state, ids[:, j])
            return logits
        cos, sin = self.cos[p0:p0 + t], self.sin[p0:p0 + t]  # (T, hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids)  # (B, T, H)
        if t == 1:
            x = x[:, 0]  # (B, H): one-row products, the decode hot path
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.n1, self.eps)
            q, k, v = layer.qkv(h)
            q = q.view(b, t, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(b, t, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = v.view(b, t, nkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc, vc = state.k_cache[li], state.v_cache[li]
            kc[:, :, p0:p0 + t] = k
            vc[:, :, p0:p0 + t] = v
            keys, values = kc[:, :, :p0 + t], vc[:, :, :p0 + t]  # (B, nkv, P, hd)
            if t == 1:
                # grouped-query attention without repeating K/V: fold the query groups into rows
                # grouped-query attention without repeating K/V: fold the query groups into rows.
                # Broadcast products and small reductions instead of bmm/softmax: for these tiny
                # sizes they stay on one thread, which avoids a thread fork/join per op.
                qg = q.view(b, nkv, nh // nkv, 1, hd)  # (B, nkv, g, 1, hd)
                s = (qg * keys.unsqueeze(2)).sum(-1) * self.scale  # (B, nkv, g, P)
                e = (s - s.amax(-1, keepdim=True)).exp()
                att = e / e.sum(-1, keepdim=True)
                y = (att.unsqueeze(-1) * values.unsqueeze(2)).sum(-2).reshape(b, nh * hd)  # (B, nh*hd)
            else:
                # a chunk after cached positions: each new token sees the cache and the chunk up to itself
                mask = None if p0 == 0 else torch.ones(t, p0 + t, dtype=torch.bool).tril(p0)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=p0 == 0,
                                                   scale=self.scale, enable_gqa=nh != nkv)  # (B, nh, T, hd)
                y = y.transpose(1, 2).reshape(b, t, nh * hd)
            x = x + layer.o(y)
            h = rms_norm(x, layer.n2, self.eps)
            gate, up = layer.gate_up(h)
            x = x + layer.down(F.silu(gate) * up)
        state.pos = p0 + t
        return self.logits(x if t == 1 else x[:, -1])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output head for a few rows, ``x`` (B, H) -> fp32 logits (B, V): the compiled
        :func:`decode_head` once a compiled step has run (the decode step's own kernel: one pass over
        the head, in its stored dtype), else the head's :class:`Projection`."""
        if self.head_compiled and self.matvec == "compiled":
            return compiled("head")(x.contiguous(), self.norm, self.head_parts, self.eps)
        return self.lm_head(rms_norm(x, self.norm, self.eps)).float()

    def _compiled_step(self, state: DecodeSession, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through the compiled :func:`decode_layer` / :func:`decode_head`."""
        key = (tokens.shape[0], state.capacity)
        if key in self._warm:
            return self._run_compiled(state, tokens)
        with self._lock:  # the first run of a shape compiles: one thread at a time
            if self.matvec != "compiled":  # another thread found that compiling fails
                return self.forward(state, tokens.view(-1, 1))
            try:
                logits = self._run_compiled(state, tokens)
            except Exception as exc:  # no working compiler, or an Inductor failure: stay correct, run eagerly
                if self._warm:  # it compiled and ran before: this is a real error
                    raise
                log.warning("torch.compile failed (%s: %s); decoding eagerly, which is slower",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.matvec = "eager"  # the unfused projections' own forward
                return self.forward(state, tokens.view(-1, 1))
            self._warm.add(key)
            return logits

    def _run_compiled(self, state: DecodeSession, tokens: torch.Tensor) -> torch.Tensor:
        p, cap = state.pos, state.capacity
        layer, head = compiled("layer"), compiled("head")
        x = self.embed(tokens)  # (B, H)
        pos = torch.tensor([p])
        cos, sin = self.cos[p], self.sin[p]
        mask = torch.zeros(cap, dtype=self.dtype).masked_fill_(torch.arange(cap) > p, float("-inf"))
        for li, wts in enumerate(self.step_weights):
            x = layer(x, wts, state.k_cache[li], state.v_cache[li], pos, cos, sin, mask, n_heads=self.n_heads,
                      n_kv=self.n_kv, head_dim=self.head_dim, eps=self.eps)
        logits = head(x, self.norm, self.head_parts, self.eps)
        self.head_compiled = True
        state.pos = p + 1
        return logits


def linear_parts(module: nn.Module) -> Parts | None:
    """The compiled step's view of a projection: an ``nn.Linear``'s weight and bias, or what a
    :class:`DecodePlugin` offers through ``decode_parts()`` (the 8-bit lab's ``Int8Linear`` gives its
    int8 codes, 1/scale and zero point); None if it offers nothing."""
    if type(module) is nn.Linear:
        return (module.weight.detach(), None, None, None if module.bias is None else module.bias.detach())
    if isinstance(module, DecodePlugin):
        return module.decode_parts()
    return None


def layer_projections(blk: nn.Module) -> tuple[nn.Module, ...]:
    """A decoder layer's projections, in :func:`decode_layer`'s order: q, k, v, o, gate, up, down."""
    a, m = blk.self_attn, blk.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)


def compilable(model: Any) -> bool:
    """Whether the compiled step can run every projection (see :func:`linear_parts`)."""
    try:
        mods = [model.lm_head, *(p for blk in model.model.layers for p in layer_projections(blk))]
    except AttributeError:
        return False
    return all(linear_parts(m) is not None for m in mods)


def auto_matvec(model: Any) -> str:
    """``compiled`` for a model whose projections all have a compiled form, big enough to repay the compilation (and a C++ compiler
    to compile with), else ``mm``. ``LLMCOURSE_COMPILE=0`` forces ``mm``, ``=1`` forces ``compiled``."""
    env = os.environ.get("LLMCOURSE_COMPILE", "").strip()
    if env == "0" or not compilable(model):
        return "mm"
    if env == "1":
        return "compiled"
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return "compiled" if size >= AUTO_MIN_BYTES and can_compile() else "mm"


def supports(model: Any) -> bool:
    """Whether :class:`FastLlama` can run ``model``."""
    cfg = getattr(model, "config", None)
    return (cfg is not None and getattr(cfg, "model_type", None) in SUPPORTED and hasattr(model, "model")
            and hasattr(model.model, "layers") and not (getattr(cfg, "use_sliding_window", False)
                                                        and getattr(cfg, "sliding_window", None)))
