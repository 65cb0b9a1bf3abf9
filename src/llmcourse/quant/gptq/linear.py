"""``GPTQLinear``: a linear layer that stores the standard packed GPTQ tensors and runs on a CPU.

It holds exactly the checkpoint's tensors (:mod:`llmcourse.quant.gptq.pack`) as buffers under
the checkpoint's names, so its ``state_dict`` is the file's. ``forward`` de-quantizes the weight
per group, ``W[o, i] = scales[g_idx[i], o] · (q[i, o] - zero[g_idx[i], o])``, then runs
``F.linear``; the unpacked codes and zeros are kept (int8, one byte per weight) after the first
call unless ``cache_codes=False``, so later calls only do the multiply-add of the de-quantization
(in place, over equal groups when ``g_idx`` allows: no gathers).

Fast decoding (the model runtime's compiled step, its ``DecodePlugin`` protocol):
:meth:`GPTQLinear.decode_weight` hands over the one-byte codes with scales and zeros for *equal*
groups of consecutive inputs, which the compiled reduction de-quantizes inside its loads (one byte
read per weight instead of four). GPTQ's groups need not be equal: a width that the group size does
not divide ends in a shorter group (576 inputs at g128: 4 groups of 128 and one of 64). With
``g_idx[i] = i // g`` (no act-order; also group-aware reordering) every run of ``s = gcd(g, I)``
inputs lies in one group, so the same values, repeated, are scales for ``I / s`` equal groups of
``s`` (576 at g128: 9 groups of 64). Under act-order ``g_idx`` is permuted and no such run exists:
the layer then offers nothing and the step runs it through its own ``forward``.

By default 4-bit layers are decoded by the GGUF block kernels instead (:mod:`llmcourse.quant.gptq.blocks`):
the codes repacked once into ggml Q4_0 (symmetric) or Q4_1 blocks, act-order included (the inputs sorted
by group), multiplied with 8-bit activations; ``LLMCOURSE_GPTQ_KERNEL=packed`` selects the packed words.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcourse.core.runtime import PACKED_BITS, Dense, GroupCodes, PackedCodes, WordsDequantizer, pack_words
from llmcourse.core.runtime.kernels import forced_level, interleave, q8_0_quantize
from llmcourse.core.runtime.weights import BLOCK_GEMM_ROWS, BlockCodes, block_linear, project
from llmcourse.quant.gptq.blocks import (
    Q8_0,
    head_choice,
    kernel_choice,
    kernels_ready,
)
from llmcourse.quant.gptq.blocks import block_weight as gptq_block_weight
from llmcourse.quant.gptq.pack import unpack


class GPTQLinear(nn.Module):
    """A ``bits``-bit GPTQ linear layer (packed ``qweight``, ``qzeros``, fp16 ``scales``, ``g_idx``)."""

    def weight_count(self) -> int:
        """Weights this layer holds (``qweight`` packs 32 / bits of them per int32 word)."""
        return self.in_features * self.out_features

    def __init__(self, in_features: int, out_features: int, bits: int, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, cache_codes: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.compute_dtype = dtype
        self.cache_codes = cache_codes
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, tensors[name])
        self.register_buffer("bias", tensors.get("bias"))
        self._codes: torch.Tensor | None = None  # (O, I) int8, unpacked on first use
        self._zeros: torch.Tensor | None = None  # (O, G) int8
        self._equal: tuple | None = None  # equal_group_parts(), built once
        self._decode: GroupCodes | PackedCodes | None = None  # decode_weight(), built once
        self._words: tuple | None = None  # (words, scale, zero) fp32 when decode_weight packed the codes
        self._dequantize_words = WordsDequantizer()  # the words' compiled de-quantization (a prompt's)
        self._blocks: BlockCodes | bool | None = None  # block_weight(): None not built yet, False impossible

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (O, I) int8, scales (O, G) fp32, zeros (O, G) int8 with the v1 +1, g_idx (I,) long):
        what a fused kernel needs (codes in [0, 2^bits), one group per input column)."""
        codes, zeros = self._codes, self._zeros
        if codes is None or zeros is None:
            codes = unpack(self.qweight, self.bits, dim=0).t().to(torch.int8).contiguous()
            zeros = (unpack(self.qzeros, self.bits, dim=1) + 1).t().to(torch.int8).contiguous()
            if self.cache_codes:
                self._codes, self._zeros = codes, zeros
        return codes, self.scales.float().t(), zeros, self.g_idx.long()

    def equal_groups(self) -> int | None:
        """The width ``s = gcd(g, I)`` of equal runs of inputs that each lie in one group when ``g_idx``
        is natural (``g_idx[i] = i // g``); None under act-order (a permuted ``g_idx``)."""
        g_idx = self.g_idx.long()
        g = int((g_idx == 0).sum())
        if g == 0 or not torch.equal(g_idx, torch.arange(self.in_features) // g):
            return None
        return math.gcd(g, self.in_features)

    def equal_group_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(codes (O, I) int8, scale (O, G') fp32, zero (O, G') fp32)`` for ``G' = I / gcd(g, I)`` equal
        groups of consecutive inputs (each group's scale and zero repeated over its runs); None under
        act-order. Kept after the first call unless ``cache_codes=False``."""
        if self._equal is not None:
            return self._equal
        s = self.equal_groups()
        if s is None:
            return None
        codes, scales, zeros, g_idx = self.parts()
        run_group = g_idx[::s]  # the group of each run of s inputs
        equal = (codes, scales[:, run_group].contiguous(), zeros[:, run_group].float().contiguous())
        if self.cache_codes:
            self._equal = equal
        return equal

    def packs_words(self) -> bool:
        """Whether the decode step reads this layer's codes packed in 32-bit words (:func:`pack_words`):
        2, 4 or 8 bits, natural ``g_idx``, and equal runs that hold whole words."""
        s = self.equal_groups()
        return self.bits in PACKED_BITS and s is not None and s % (32 // self.bits) == 0

    def block_weight(self) -> BlockCodes | None:
        """The layer as ggml Q4_0 / Q4_1 blocks for the block kernels (:mod:`llmcourse.quant.gptq.blocks`):
        4 bits, runs of 32 (group-sorted) inputs within one group, the kernels built; else None. Built once;
        the one-byte codes cached by :meth:`parts` are dropped then (the blocks serve every product)."""
        if self._blocks is None:
            bw = None
            if self.bits == 4:
                codes, scales, zeros, g_idx = self.parts()
                bias = None if self.bias is None else self.bias.to(self.compute_dtype)
                bw = gptq_block_weight(codes, scales, zeros, g_idx, bias)
            self._blocks = bw if bw is not None else False
            if bw is not None:
                self._codes = self._zeros = None
                self._equal = None
        return self._blocks or None

    def uses_blocks(self) -> BlockCodes | None:
        """:meth:`block_weight` when the block kernels are chosen (``LLMCOURSE_GPTQ_KERNEL``, default) and fit."""
        return self.block_weight() if kernel_choice() == "blocks" else None

    def decode_weight(self) -> BlockCodes | GroupCodes | PackedCodes | None:
        """The model runtime's compiled view (``DecodePlugin``): the codes with scales and zeros for
        ``G' = I / gcd(g, I)`` equal groups (:meth:`equal_group_parts`), ``W[o, i] = (q[o, i] - zero[o, g]) ·
        scale[o, g]``; None under act-order. The codes are 32-bit words packing ``32 / bits`` codes each
        (:class:`PackedCodes`, :meth:`packs_words`: 2/4/8 bits; the step unpacks them inside its reduction,
        one read of the packed weight per token), else one byte each (:class:`GroupCodes`, 3 bits).
        Built once; the words replace the cached one-byte codes (half the memory at 4 bits).
        With the block kernels (:meth:`uses_blocks`): the :class:`BlockCodes`, act-order included."""
        bw = self.uses_blocks()
        if bw is not None:
            return bw
        if self._decode is None:
            equal = self.equal_group_parts()
            if equal is None:
                return None
            codes, scale, zero = equal
            dtype = self.compute_dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            if self.packs_words():
                words = pack_words(codes, scale.shape[-1], self.bits)
                self._words = (words, scale, zero)  # with the fp32 scale and zero, for dequantize
                self._codes = None  # the words serve the prompt's de-quantization too (dequantize)
                self._equal = None
                self._decode = PackedCodes(words, self.bits, scale.to(dtype), zero.to(dtype), bias)
            else:
                self._decode = GroupCodes(codes, scale.to(dtype), zero.to(dtype), bias)
        return self._decode

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight de-quantized per group, ``scales[g_idx] · (q - zero[g_idx])``, in fp32,
        then cast to ``dtype``. With equal groups (no act-order) it is one conversion and two in-place
        passes over the (O, G', I / G') view, with no gathers: what a prompt's products pay per layer."""
        if self._words is not None:  # the decode step's packed words, unpacked in one compiled pass
            words, scale, zero = self._words
            return self._dequantize_words(words, self.bits, scale, zero).to(dtype or self.compute_dtype)
        equal = self.equal_group_parts()
        if equal is not None:
            codes, scale, zero = equal
            o, groups = scale.shape
            w = codes.view(o, groups, -1).to(torch.float32)
            w = w.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).view(o, -1)
        else:
            codes, scales, zeros, g = self.parts()
            w = codes.to(torch.float32).sub_(zeros[:, g].float()).mul_(scales[:, g])
        return w.to(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight, computed on each access (for code that reads ``.weight``)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bw = self.uses_blocks()
        if bw is not None:  # a few rows: the block kernel; many: de-quantized blocks and the GEMM
            y = block_linear(bw, x.reshape(-1, self.in_features), self.in_features)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        groups = self.scales.shape[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={groups}, bias={self.bias is not None}")


class HalfTable(nn.Module):
    """The embedding table that a GPTQ checkpoint stores in fp16, kept in fp16 when the model computes in
    fp32, for both of its uses when the output head is tied to it: ``forward(ids)`` looks rows up and
    returns them in fp32; a :class:`HalfHead` on it is the output head ``x Tᵀ``. fp16 -> fp32 is exact, so
    every value is the one an fp32 copy would hold; the table takes half the memory, and the compiled
    decode step (:meth:`HalfHead.decode_weight`) reads two bytes per weight for the head's product
    instead of four (measured: 1.8 ms instead of 3.9 ms per token for 49152 x 576, 2 threads)."""

    weight_buffers = ("table",)  # counted as weights by LoadedModel.n_params

    def __init__(self, table: torch.Tensor, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx
        self.compute_dtype = dtype
        self.register_buffer("table", table)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in the compute dtype, built on each access (for code that reads ``.weight``)."""
        return self.table.to(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored {self.table.dtype}"


class HalfHead(nn.Module):
    """The output head tied to a :class:`HalfTable`: the same fp16 tensor, products in the compute dtype."""

    def __init__(self, table: HalfTable) -> None:
        super().__init__()
        self.out_features, self.in_features = table.table.shape
        self.tied = [table]  # a list: not a submodule, so the table is not counted or saved twice
        self._blocks: BlockCodes | bool | None = None  # block_weight(): None not built yet, False impossible

    @property
    def weight(self) -> torch.Tensor:
        return self.tied[0].weight

    def block_weight(self) -> BlockCodes | None:
        """The table re-quantized to Q8_0 blocks (once) unless ``LLMCOURSE_GPTQ_HEAD=fp16``
        (:func:`~llmcourse.quant.gptq.blocks.head_choice`) or the kernels are missing; else None."""
        if head_choice() != "q8_0":
            return None
        if self._blocks is None:
            table = self.tied[0].table
            self._blocks = False
            if table.shape[1] % 32 == 0 and kernels_ready():
                blocks, qtype = interleave(q8_0_quantize(table), Q8_0, table.shape[1])
                self._blocks = BlockCodes(blocks, qtype, self.out_features, level=forced_level())
        return self._blocks or None

    def decode_weight(self) -> Dense | BlockCodes:
        """The compiled step's view (``DecodePlugin``): the fp16 weight itself, converted inside the loads (or
        its Q8_0 blocks, :meth:`block_weight`)."""
        return self.block_weight() or Dense(self.tied[0].table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Tᵀ``, converting the table in slices of :data:`HEAD_SLICE` rows (no whole fp32 copy)."""
        bw = self.block_weight()
        if bw is not None and x.reshape(-1, self.in_features).shape[0] < BLOCK_GEMM_ROWS:
            y = project(bw, x.reshape(-1, self.in_features))
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        table = self.tied[0].table
        return torch.cat([F.linear(x, table[r:r + HEAD_SLICE].to(x.dtype))
                          for r in range(0, self.out_features, HEAD_SLICE)], dim=-1)


HEAD_SLICE = 4096  # output rows of the fp16 head converted at a time (9 MB in fp32 at 576 wide)


def half_tied_embedding(model: nn.Module, table: torch.Tensor) -> None:
    """Give ``model`` (fp32, its output head tied to its input embedding) a :class:`HalfTable` holding
    ``table`` (the checkpoint's fp16 embedding) and a :class:`HalfHead` on it, in place of both."""
    old = model.get_input_embeddings()
    half = HalfTable(table, getattr(old, "padding_idx", None), dtype=old.weight.dtype)
    model.set_input_embeddings(half)
    model.set_output_embeddings(HalfHead(half))
