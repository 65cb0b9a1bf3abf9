"""The weight kinds a decoder layer multiplies by, and their products.

A projection ``y = x Wᵀ + b`` of a model is held in one of these forms (a small typed protocol: each
kind is a frozen dataclass, told apart by its class, never by its shape):

* :class:`Dense` — a float weight (O, I) as stored (fp32, or fp16 for a GPTQ checkpoint's tied head);
* :class:`RowCodes` — one-byte codes with one scale per output row, ``W = (q - z) / s``
  (the 8-bit lab's absmax / zero-point weights);
* :class:`GroupCodes` — one-byte codes with a scale per group of ``I / G`` consecutive inputs,
  ``W[o, i] = (q[o, i] - z[o, g]) · s[o, g]`` (3-bit GPTQ);
* :class:`PackedCodes` — the same with ``bits`` in {2, 4, 8} codes packed ``32 / bits`` to a 32-bit word
  (:func:`pack_words`; 2/4/8-bit GPTQ: half a byte read per 4-bit weight);
* :class:`BlockCodes` — ggml's quantized blocks as stored in a GGUF file (Q8_0, Q4_0 ... Q6_K), multiplied
  by the block kernels of :mod:`~llmcourse.core.runtime.kernels` with 8-bit activations (also other codes
  repacked into blocks at load, with an optional per-output scale and input permutation);
* :class:`ModuleWeight` — any other module (LLM.int8(), a layer of another lab), called as ``module(x)``
  on the eager path only.

:func:`project` is the product for every kind. Under ``torch.compile`` (the decode step) a product is
written as a reduction that TorchInductor turns into one row-parallel pass over the weight, with the
codes de-quantized inside its loads; eagerly it runs PyTorch's kernels (:func:`matvec`, ``F.linear``).

The kernels that read codes are chosen by :class:`KernelOptions` (an argument of the runtime, detected
once per process, overridable by environment variables documented there).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH = 8  # up to this many rows run as one-row products on the eager path (matvec)
MATVEC_CHUNKS = 8  # a few-row eager product splits W's output rows into this many batches (see matvec)
TILE = 16  # output rows per tile of the compiled several-row product (see rows_dot)
PACKED_BITS = (2, 4, 8)  # code widths that fill an int32 word exactly (32 / bits codes per word)


# --- kernel options -------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelOptions:
    """Which kernels the compiled step uses on this CPU.

    ``byte_words``: read one-byte codes four at a time as 32-bit words (:func:`byte_dot`). On a CPU
    without AVX-512, TorchInductor loads an int8 (or int32) vector through a stack copy, 8 bytes at a
    time, which made the weight-only int8 step 4-5x *slower* than fp32 (118-131 ms per token of the
    default model against 27-30 ms); on AVX-512 CPUs plain one-byte loads are fast.
    ``compile``: compile the decode step (True), never (False), or decide by the model's size (None).
    ``compile_kernels``: compile the quantization labs' own one-row kernels (False: their eager form).
    """

    byte_words: bool
    compile: bool | None = None
    compile_kernels: bool = True

    @staticmethod
    @functools.cache
    def detect() -> KernelOptions:
        """The options for this CPU, read once per process. Overrides: ``LLMCOURSE_BYTE_WORDS=0|1``,
        ``LLMCOURSE_COMPILE=0|1``, ``LLMCOURSE_INT8_COMPILE=0``."""
        forced = os.environ.get("LLMCOURSE_BYTE_WORDS")
        words = (forced == "1" if forced in ("0", "1")
                 else not torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
        comp = os.environ.get("LLMCOURSE_COMPILE", "").strip()
        return KernelOptions(byte_words=words, compile={"0": False, "1": True}.get(comp),
                             compile_kernels=os.environ.get("LLMCOURSE_INT8_COMPILE", "1") != "0")


# --- the weight kinds -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dense:
    """A float weight (O, I) in its stored dtype, and an optional bias (O,)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class RowCodes:
    """One-byte codes (O, I) int8/uint8 with one scale per row: ``W = (q - zero) · inv_scale``.

    ``inv_scale`` (O, 1) is ``1 / s``; ``zero`` (O, 1) or None. ``byte_words`` reads the codes as 32-bit
    words (:class:`KernelOptions`)."""

    codes: torch.Tensor
    inv_scale: torch.Tensor
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    byte_words: bool = False


@dataclass(frozen=True)
class GroupCodes:
    """One-byte codes (O, I) with ``G`` equal groups of consecutive inputs:
    ``W[o, i] = (q[o, i] - zero[o, g]) · scale[o, g]``, ``g = i // (I / G)``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class PackedCodes:
    """Unsigned ``bits``-bit codes packed ``32 / bits`` to a word (:func:`pack_words`), ``G`` equal groups:
    the same ``W`` as :class:`GroupCodes`. ``words`` (O, I · bits / 32) holds the int32 words' bits in a
    float32 tensor: TorchInductor loads a float32 vector with one instruction on AVX2, an int32 vector
    through a stack copy (106 M 4-bit weights: 17 ms as int32 words, 5.9 ms as float32 bits)."""

    words: torch.Tensor
    bits: int
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockCodes:
    """A weight (O, I) as ggml blocks of type ``qtype`` (a ``GGMLQuantizationType`` value the kernels run,
    :data:`~llmcourse.core.runtime.kernels.BLOCK_TYPES`): ``blocks`` uint8 (O, row bytes), usually mapped
    from the file. ``level`` caps the kernels' instruction set (-1: the best the CPU has)."""

    blocks: torch.Tensor
    qtype: int
    out_features: int
    bias: torch.Tensor | None = None
    level: int = -1
    # Other labs' codes repacked as blocks (the 8-bit lab's int8 rows as Q8_0 with d = 1, GPTQ's 4-bit groups
    # as Q4_0 / Q4_1): ``scale`` (O,) fp32 multiplies each output (a per-row scale the blocks do not hold),
    # ``perm`` (I,) int64 takes the inputs in that order first (GPTQ's act-order, its groups made contiguous).
    scale: torch.Tensor | None = None
    perm: torch.Tensor | None = None


@dataclass(frozen=True)
class ModuleWeight:
    """Any other module, run as ``module(x)`` (eager only: it has no compiled form)."""

    module: nn.Module


Weight = Dense | RowCodes | GroupCodes | PackedCodes | BlockCodes | ModuleWeight
COMPILED_KINDS = (Dense, RowCodes, GroupCodes, PackedCodes, BlockCodes)


@runtime_checkable
class DecodePlugin(Protocol):
    """A module that replaces an ``nn.Linear`` and offers its weight to the compiled decode step."""

    def decode_weight(self) -> Weight | None:
        """This projection as a compiled weight kind, or None to be called as ``module(x)`` (eagerly)."""
        ...


def eager_weight(module: nn.Module) -> Dense | ModuleWeight:
    """The eager path's view of a projection: an ``nn.Linear``'s own tensors (no copies), else the module."""
    if type(module) is nn.Linear:
        return Dense(module.weight.detach(), None if module.bias is None else module.bias.detach())
    return ModuleWeight(module)


def step_weight(module: nn.Module, options: KernelOptions) -> Weight | None:
    """The compiled step's view of a projection: an ``nn.Linear``'s tensors or what a :class:`DecodePlugin`
    offers; None if it has no compiled form."""
    if type(module) is nn.Linear:
        return eager_weight(module)
    if isinstance(module, DecodePlugin):
        w = module.decode_weight()
        if isinstance(w, RowCodes):
            usable = w.codes.shape[-1] % 4 == 0 and w.codes.is_contiguous()
            return RowCodes(w.codes, w.inv_scale, w.zero, w.bias, options.byte_words and usable)
        return w
    return None


# --- products -------------------------------------------------------------------------------------

def project(w: Weight, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b`` for any weight kind: ``x`` (..., I) -> (..., O).

    Traced by ``torch.compile`` (the decode step): a reduction over the weight, codes de-quantized inside
    the loads. Eager: PyTorch's kernels (:func:`matvec` for a few rows, ``F.linear`` for many)."""
    if isinstance(w, ModuleWeight):
        return w.module(x)
    lead, i = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, i)
    if isinstance(w, Dense) and not torch.compiler.is_compiling():
        y = matvec(w.weight, rows)
    elif isinstance(w, Dense):
        y = rows_dot(w.weight, rows)
    elif isinstance(w, BlockCodes):  # an opaque call of the C++ kernel, compiled or not
        xb = rows.float() if w.perm is None else rows.float().index_select(-1, w.perm)
        y = torch.ops.llmcourse_blocks.mm(xb.contiguous(), w.blocks, w.qtype, w.out_features, w.level, w.scale)
        y = y.to(rows.dtype)
    elif isinstance(w, PackedCodes):
        y = packed_dot(w.words, w.scale, w.zero, rows)
    elif isinstance(w, GroupCodes):
        o, g = w.scale.shape
        q = w.codes.to(rows.dtype).view(o, g, i // g)
        if w.zero is not None:
            q = q - w.zero.unsqueeze(-1)
        y = rows_dot((q * w.scale.unsqueeze(-1)).view(o, i), rows)
    else:  # RowCodes: y = (x Qᵀ - z Σx) / s
        if w.byte_words:
            y = byte_dot(w.codes, rows)
            if w.zero is not None:
                y = y - w.zero.view(1, -1) * rows.sum(-1, keepdim=True)
        else:
            q = w.codes.to(rows.dtype)
            y = rows_dot(q if w.zero is None else q - w.zero, rows)
        y = y * w.inv_scale.view(1, -1)
    if w.bias is not None:
        y = y + w.bias
    return y.view(*lead, y.shape[-1])


def project_many(ws: tuple[Weight, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """:func:`project` of one input by several weights (q/k/v, gate/up). Block weights that take the inputs in
    their stored order go through one kernel call (``mm_many``): the activations quantized once, one parallel
    pass over all their rows, one dispatch instead of one per weight; any other mix, one :func:`project` each."""
    if len(ws) < 2 or not all(isinstance(w, BlockCodes) and w.perm is None for w in ws) \
            or len({w.level for w in ws}) != 1:
        return [project(w, x) for w in ws]
    lead, i = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, i)
    ys = torch.ops.llmcourse_blocks.mm_many(rows.float().contiguous(), [w.blocks for w in ws], [w.qtype for w in ws],
                                            [w.out_features for w in ws], ws[0].level, [w.scale for w in ws])
    out = []
    for w, y in zip(ws, ys, strict=True):
        y = y.to(rows.dtype)
        if w.bias is not None:
            y = y + w.bias
        out.append(y.view(*lead, y.shape[-1]))
    return out


BLOCK_GEMM_ROWS = int(os.environ.get("LLMCOURSE_BLOCK_GEMM_ROWS", "64"))  # from this many rows: de-quantize + GEMM
BLOCK_GEMM_CHUNK = 4096  # weight rows de-quantized at a time on that path (the 49152-row head: 9 MB at a time)


def block_linear(w: BlockCodes, x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x Wᵀ + b`` for ``x`` (N, I) with ``W`` held as ``w``'s blocks, as a module's forward runs it: fewer than
    :data:`BLOCK_GEMM_ROWS` rows through the block kernel (:func:`project`: 8-bit activations, as the compiled
    step); more (a long prompt, perplexity) de-quantize :data:`BLOCK_GEMM_CHUNK` weight rows at a time and use
    PyTorch's fp32 GEMM (compute-bound there, and faster than the integer dot products), so the transient float
    weight stays small. Returns ``x``'s dtype for a few rows (as :func:`project`), fp32 for many."""
    if x.shape[0] < BLOCK_GEMM_ROWS:
        return project(w, x)
    from llmcourse.core.runtime.kernels import block_rows

    xf = x.float() if w.perm is None else x.float().index_select(-1, w.perm)
    xf = xf.contiguous()
    y = xf.new_empty(x.shape[0], w.out_features)
    for r0 in range(0, w.out_features, BLOCK_GEMM_CHUNK):
        r1 = min(w.out_features, r0 + BLOCK_GEMM_CHUNK)
        y[:, r0:r1] = xf @ block_rows(w.blocks, torch.arange(r0, r1), w.qtype, in_features).t()
    if w.scale is not None:
        y = y * w.scale
    if w.bias is not None:
        y = y + w.bias
    return y


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` with ``W`` (O, I) in its usual layout: ``x`` (..., I) -> (..., O), eagerly.

    For one to :data:`SMALL_BATCH` rows, ``W`` is viewed as ``MATVEC_CHUNKS`` stacked (O/8, I) blocks
    and multiplied by ``torch.bmm``: here that runs at the bandwidth of ``x @ Wᵀ`` with ``Wᵀ`` stored
    transposed (``F.linear`` for one row reads (O, I) at half that, shared/MACHINE.md), so no transposed
    copy of the weights is needed. More rows (a prompt) take ``F.linear``'s GEMM."""
    o, i = w.shape
    rows = x.reshape(-1, i)
    b = rows.shape[0]
    if b > SMALL_BATCH or o % MATVEC_CHUNKS or not w.is_contiguous() or w.dtype != x.dtype:
        return F.linear(x, w.to(x.dtype))
    y = torch.bmm(w.view(MATVEC_CHUNKS, o // MATVEC_CHUNKS, i), rows.t().expand(MATVEC_CHUNKS, i, b))
    y = y.reshape(o, b).t()  # (B, O)
    return (y if b == 1 else y.contiguous()).view(*x.shape[:-1], o)


def rows_dot(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` for a few rows written as a reduction: ``x`` (B, I), ``w`` (O, I) -> (B, O).

    One row: ``y_o = Σ_i w_oi x_i``, which Inductor runs as a row-parallel streaming pass over ``w``.
    Several rows (beams, batch slots): the outputs are taken in tiles of ``TILE`` weight rows and every
    row of ``x`` meets a tile while it is in cache, so ``w`` is still read from memory once per step
    (B = 4 costs 1.6x one row, not 4x)."""
    b = x.shape[0]
    o, i = w.shape
    if b == 1 or o % TILE:
        return (x.unsqueeze(1) * w.unsqueeze(0)).sum(-1)
    part = (w.view(o // TILE, 1, TILE, i) * x.view(1, b, 1, i)).sum(-1)  # (O/T, B, T)
    return part.permute(1, 0, 2).reshape(b, o)


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


# --- codes packed in 32-bit words -----------------------------------------------------------------

def pack_words(codes: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Pack unsigned ``codes`` (O, I) of ``bits`` bits into 32-bit words (O, I / c), ``c = 32 / bits``, in the
    layout :func:`packed_dot` reads: within each of ``groups`` runs of ``s = I / groups`` inputs, word ``j``
    holds the codes of inputs ``j + k s / c`` (k = 0 .. c-1) at bits ``[k·bits, (k+1)·bits)``. So a vector of
    consecutive words meets a vector of consecutive inputs for every ``k``: the compiled loop loads whole
    words and whole input vectors, never single bytes. Returned as a float32 view of the int32 bits
    (see :class:`PackedCodes`)."""
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


def dequantize_words_eager(words: torch.Tensor, bits: int, scale: torch.Tensor,
                           zero: torch.Tensor | None) -> torch.Tensor:
    """The weight (O, I) in ``scale``'s dtype of ``bits``-bit codes packed by :func:`pack_words`:
    ``W[o, i] = (q[o, i] - zero[o, g]) · scale[o, g]``."""
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
    over whole vectors (no ragged tail of groups). Several rows share each tile of ``TILE`` weight rows
    while it is in cache, as in :func:`rows_dot`."""
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


class WordsDequantizer:
    """:func:`dequantize_words_eager` compiled into one pass that reads the words and writes W (the eager
    unpacking makes four passes over W-sized tensors) when a C++ compiler is there; it falls back to the
    eager form for good if compiling fails. A prompt's products use it: many rows make them
    compute-bound, where ``F.linear``'s GEMM is the tool. Held by the layer that uses it (Dynamo keeps one
    set of compiled specialisations per function, so instances share them)."""

    def __init__(self) -> None:
        self._fn = None

    def __call__(self, words: torch.Tensor, bits: int, scale: torch.Tensor,
                 zero: torch.Tensor | None) -> torch.Tensor:
        from llmcourse.core.runtime.compile import can_compile, compile_fn, compile_settings

        if self._fn is None:
            self._fn = compile_fn(dequantize_words_eager) if can_compile() else dequantize_words_eager
        if self._fn is dequantize_words_eager:
            return dequantize_words_eager(words, bits, scale, zero)
        try:
            with compile_settings():
                return self._fn(words, bits, scale, zero)
        except Exception:  # an Inductor failure: stay correct, unpack eagerly from now on
            import logging

            logging.getLogger(__name__).warning("torch.compile failed for the de-quantization; unpacking eagerly")
            self._fn = dequantize_words_eager
            return dequantize_words_eager(words, bits, scale, zero)

