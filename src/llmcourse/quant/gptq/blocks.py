"""GPTQ's 4-bit groups as ggml blocks: the GGUF block kernels decode GPTQ folders (8-bit activations).

A GPTQ layer stores ``W[o, i] = s[o, g] · (q[o, i] - z[o, g])`` with 4-bit codes ``q``, fp16 scales ``s`` and
integer zeros ``z`` per group ``g = g_idx[i]`` (:mod:`llmcourse.quant.gptq.pack`). ggml's legacy blocks hold 32
consecutive inputs with one fp16 scale (Q4_0: ``w = d · (q - 8)``; Q4_1: ``w = d · q + m``), so each run of 32
inputs that lies in one group is one block:

* symmetric GPTQ (every ``z = 8``): Q4_0 with ``d = s`` — the checkpoint's own fp16 scale, so the blocks hold
  exactly the checkpoint's weights (18 bytes per 32 weights);
* asymmetric: Q4_1 with ``d = s`` and ``m = fp16(-s · z)`` — ``s · z`` is exact in fp32 and rounded once to
  fp16 (relative error <= 2⁻¹¹ of ``m``, within half an fp16 ulp; 20 bytes per 32 weights). The kernel also
  meets ``m`` with an fp16-rounded activation sum, as ggml's Q4_1 x Q8_1 product does.

A group of 128 is 4 blocks sharing ``d`` (and ``m``); a width the group size does not divide ends in a shorter
group (576 inputs at g128: 4 x 128 + 64), still whole blocks when the group size and the width are multiples
of 32. Under act-order (``desc_act``) ``g_idx`` is a permutation of such groups: the inputs are sorted by
group once at load (a stable sort, ``perm``), the codes' columns permuted with them, and the runtime takes
the activations in the same order (:class:`~llmcourse.core.runtime.weights.BlockCodes`' ``perm``), so
``x Wᵀ = x[perm] W[:, perm]ᵀ`` with contiguous groups.

Products then quantize the activations to 8-bit blocks on the fly (``d_a = max|x| / 127`` per 32 values, as
llama.cpp's CPU backend): the only difference from de-quantize-then-multiply besides fp32 summation order
(and Q4_1's ``m``). ``LLMCOURSE_GPTQ_KERNEL=packed`` keeps the runtime's compiled reduction over packed
32-bit words (fp32 activations) instead.
"""

from __future__ import annotations

import functools

import torch

from llmcourse.core.env import env_choice
from llmcourse.core.runtime.weights import BlockCodes

Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids
BLOCK = 32  # values per legacy block
KERNELS = ("blocks", "packed")


@functools.cache
def kernel_choice() -> str:
    """Which product decodes GPTQ folders: ``blocks`` (the default; this module) or ``packed``
    (``LLMCOURSE_GPTQ_KERNEL``, read once per process: tests that set it call ``kernel_choice.cache_clear()``;
    another value logs a warning and keeps ``blocks``)."""
    return env_choice("LLMCOURSE_GPTQ_KERNEL", KERNELS, "blocks")


def kernels_ready() -> bool:
    """Whether the block kernels are built and loaded (compiled once per machine; False without a compiler)."""
    from llmcourse.core.runtime.kernels import load

    return load()


def group_order(g_idx: torch.Tensor) -> torch.Tensor | None:
    """The input order that makes each group contiguous: None when ``g_idx`` is already sorted (no act-order),
    else a stable ``argsort`` (I,) int64."""
    g = g_idx.long()
    if bool((g[1:] >= g[:-1]).all()):
        return None
    return torch.argsort(g, stable=True)


def to_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None] | None:
    """``(blocks (O, I/32 · bytes) uint8, qtype, perm)`` for 4-bit ``codes`` (O, I) in [0, 16), fp16-exact
    ``scales`` (O, G), integer ``zeros`` (O, G) and ``g_idx`` (I,); None when some run of 32 (sorted) inputs
    spans two groups."""
    o, i = codes.shape
    if i % BLOCK:
        return None
    perm = group_order(g_idx)
    g = g_idx.long() if perm is None else g_idx.long()[perm]
    runs = g.view(-1, BLOCK)
    if not bool((runs == runs[:, :1]).all()):
        return None
    if perm is not None:
        codes = codes[:, perm]
    nb = i // BLOCK
    gb = runs[:, 0]  # the group of each block (nb,)
    d = scales.to(torch.float16)[:, gb].contiguous()  # (O, nb); the checkpoint's scales are fp16 already
    z = zeros[:, gb].to(torch.float32)
    q = codes.to(torch.uint8).view(o, nb, BLOCK)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # ggml: byte j holds value j (low) and j + 16 (high)
    parts = [d.view(torch.uint8).view(o, nb, 2)]
    if bool((z == 8).all()):
        qtype = Q4_0
    else:
        qtype = Q4_1
        m = (-(d.float() * z)).to(torch.float16).contiguous()
        parts.append(m.view(torch.uint8).view(o, nb, 2))
    blocks = torch.cat([*parts, nibbles], dim=-1).view(o, -1).contiguous()
    return blocks, qtype, perm


def block_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bias: torch.Tensor | None) -> BlockCodes | None:
    """The runtime's :class:`BlockCodes` for one GPTQ layer (see :func:`to_blocks`), or None when the layout
    does not allow it or the kernels are not there."""
    if not kernels_ready():
        return None
    packed = to_blocks(codes, scales, zeros, g_idx)
    if packed is None:
        return None
    from llmcourse.core.runtime.kernels import forced_level, interleave

    blocks, qtype, perm = packed
    blocks, qtype = interleave(blocks, qtype, codes.shape[1])
    return BlockCodes(blocks, qtype, codes.shape[0], bias, forced_level(), perm=perm)


HEADS = ("fp16", "q8_0")


@functools.cache
def head_choice() -> str:
    """How the tied fp16 output head multiplies a few rows (decoding): ``q8_0`` (the default: the table
    re-quantized once to Q8_0 blocks, 34 bytes per 32 weights instead of 64, for the Q8_0 kernel, as a GGUF
    file's head; on the default model KL 0.0008 from the fp16 head, top-1 98.6%, KL to fp32 unchanged at
    0.5454) or ``fp16`` (the checkpoint's table itself): ``LLMCOURSE_GPTQ_HEAD``, read once per process (tests
    that set it call ``head_choice.cache_clear()``; another value logs a warning and keeps ``q8_0``).
    Lookups and many-row products (perplexity) always use the fp16 table."""
    return env_choice("LLMCOURSE_GPTQ_HEAD", HEADS, "q8_0")

