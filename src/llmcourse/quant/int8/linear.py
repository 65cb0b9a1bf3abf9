"""Runtime modules that store int8 weights: a weight-only ``Int8Linear`` and an ``Int8Embedding``.

Weight-only int8 (as gpt-fast's ``WeightOnlyInt8Linear``): the weight is kept as int8 codes ``q``
with fp32 scales ``s`` (and zero-points ``z``) from :mod:`llmcourse.quant.int8.formulas`; the activations
stay in floating point. For an input row ``x`` and an absmax-per-row weight,

    y_o = (sum_i q_oi x_i) / s_o            (zero-point:  y_o = (sum_i (q_oi - z_o) x_i) / s_o)

One-row decoding is bound by memory traffic, so reading 1 byte per weight instead of 4 is the
speed-up. ``F.linear`` has no int8 x float kernel, so for a single row (the decoding case) the
product above runs as a row-wise reduction ``(q.float() * x).sum(-1) * (1/s)`` compiled by
TorchInductor (once per weight shape, cached on disk) into one pass over the int8 codes: no fp32
copy of the weight is made.
Several rows (prefill, perplexity) de-quantize the weight once per call and use ``F.linear``,
which is compute-bound there anyway. Group-wise statistics always take that second path.

Set ``LLMCOURSE_INT8_COMPILE=0`` to run the eager (slower, same result) row-wise path instead.

W8A8 through the GGUF block kernels (the default for decoding absmax per-row / per-tensor weights;
``LLMCOURSE_INT8_KERNEL=rows`` keeps the weight-only reduction above): int8 codes with one fp32 scale per
row are ggml Q8_0 blocks of 32 codes with the block scale ``d = 1`` (exact in fp16), followed by the
row's ``1/s``. They are repacked once (34 bytes per 32 weights: the codes and a constant 2-byte scale)
and multiplied by the Q8_0 kernel with the activations quantized on the fly to 8 bits per 32 values
(``d_a = fp16(max|x| / 127)``, as llama.cpp's CPU backend), an exact integer dot product per block:

    y_o = (1 / s_o) · Σ_b d_a,b Σ_{i∈b} q_oi q_a,i          (W8A8)

so the result differs from the weight-only product only by the activations' 8-bit rounding (and fp32
summation order). A few rows (decoding, short prompts) take it; many rows (a long prompt, perplexity)
keep the de-quantized fp32 GEMM. Zero-point and group-wise statistics keep the weight-only paths.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcourse.core.env import env_choice
from llmcourse.core.runtime import KernelOptions, RowCodes
from llmcourse.core.runtime.weights import BLOCK_GEMM_ROWS, BlockCodes, project
from llmcourse.quant.int8.formulas import QuantizedTensor, expand_stat

log = logging.getLogger(__name__)


def _rowdot(q: torch.Tensor, inv_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 codes . (in,) fp32 -> (out, 1): ``sum_i q_oi x_i * inv_scale_o``."""
    return (q.to(torch.float32) * x).sum(-1, keepdim=True) * inv_scale


def _rowdot_zero(q: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zero-point variant: ``sum_i (q_oi - z_o) x_i * inv_scale_o`` -> (out, 1)."""
    return ((q.to(torch.float32) - zero) * x).sum(-1, keepdim=True) * inv_scale


def _rowdot_words(words: torch.Tensor, inv_scale: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """:func:`_rowdot` with the int8 codes read as 4-byte words (on CPUs without AVX-512, where
    TorchInductor loads int8 vectors slowly: :class:`llmcourse.core.runtime.KernelOptions`).

    ``words`` (out, in/4) are the codes' own bytes viewed as float32 (no copy); byte ``k`` of word ``j``
    is the code of input ``4j + k``, sign-extended with two shifts. ``xq`` (4, in/4) is ``x`` regrouped
    so that row ``k`` holds inputs ``k, 4 + k, ...``."""
    w = words.view(torch.int32)
    acc = ((w << 24) >> 24).to(torch.float32) * xq[0]
    for k in range(1, 4):
        acc = acc + ((w << (24 - 8 * k)) >> 24).to(torch.float32) * xq[k]
    return acc.sum(-1, keepdim=True) * inv_scale


def _rowdot_words_zero(words: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor,
                       xq: torch.Tensor) -> torch.Tensor:
    """Zero-point variant of :func:`_rowdot_words`: ``(sum_i q_oi x_i - z_o sum_i x_i) inv_scale_o``."""
    return _rowdot_words(words, inv_scale, xq) - zero * xq.sum() * inv_scale


_KERNELS = {"rowdot": _rowdot, "rowdot_zero": _rowdot_zero, "rowdot_words": _rowdot_words,
            "rowdot_words_zero": _rowdot_words_zero}


def _compile(name: str, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
    """Inductor code for kernel ``name`` specialised to the shapes of ``args``.

    The traced graph goes straight to ``torch._inductor.compile``: calling the result skips
    TorchDynamo's guard checks, which cost about as much as the kernel itself for the small
    matrices of a 135M model (measured: 0.26 ms -> 0.14 ms per 576 x 576 call). Our callers
    guarantee what those guards would check: :class:`RowKernels` keys the compiled code on every
    argument's shape, strides and dtype, and calls it only without autograd. If that private entry point fails, ``torch.compile`` is used instead.
    """
    import torch._inductor
    import torch.fx

    fn = _KERNELS[name]
    try:
        return torch._inductor.compile(torch.fx.symbolic_trace(fn), list(args))
    except Exception as e:  # a private API: any failure falls back to the public one
        log.warning("direct Inductor compile failed (%s: %s); using torch.compile", type(e).__name__, e)
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        return torch.compile(fn, dynamic=False)


Q8_0 = 8  # ggml's type id
KERNELS = ("blocks", "rows")


@functools.cache
def kernel_choice() -> str:
    """``blocks`` (W8A8 through the Q8_0 block kernel, the default) or ``rows`` (weight-only int8, the
    compiled row reduction): ``LLMCOURSE_INT8_KERNEL``, read once per process (tests that set it call
    ``kernel_choice.cache_clear()``); another value logs a warning and keeps ``blocks``."""
    return env_choice("LLMCOURSE_INT8_KERNEL", KERNELS, "blocks")



def q8_0_weight(codes: torch.Tensor, inv_scale: torch.Tensor, bias: torch.Tensor | None) -> BlockCodes | None:
    """absmax int8 ``codes`` (O, I) with ``inv_scale`` (O, 1) as a :class:`BlockCodes` for the Q8_0 kernel (the
    per-row ``1/s`` as its ``scale``); None when ``I`` is not a multiple of 32 or the kernels are missing."""
    from llmcourse.core.runtime.kernels import forced_level, interleave, load, q8_0_blocks

    if codes.dtype != torch.int8 or codes.shape[1] % 32 or not load():
        return None
    blocks, qtype = interleave(q8_0_blocks(codes), Q8_0, codes.shape[1])
    return BlockCodes(blocks, qtype, codes.shape[0], bias, forced_level(),
                      scale=inv_scale.reshape(-1).float().contiguous())


class RowKernels:
    """The compiled row-wise kernels of one model, keyed by kernel name and argument shapes.

    A model's :class:`Int8Linear` modules share one instance (its 7 x 30 layers have a handful of
    shapes, so a handful of compilations); a module built alone gets its own."""

    def __init__(self) -> None:
        self.compiled: dict[tuple, Callable[..., torch.Tensor]] = {}

    def __call__(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        """Run row-wise kernel ``name`` on ``args`` (compiled once per shape; eager with
        ``LLMCOURSE_INT8_COMPILE=0``)."""
        if not KernelOptions.detect().compile_kernels:
            return _KERNELS[name](*args)
        key = (name, *((a.shape, a.stride(), a.dtype) for a in args))  # what the compiled code assumes
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = _compile(name, args)
        return fn(*args)


class Int8Linear(nn.Module):
    """``y = x W'^T + b`` with ``W' = (q - z) / s`` stored as int8 codes (weight-only int8).

    Buffers: ``qweight`` int8 (out, in), ``scale`` fp32 (1, 1) / (out, 1) / (out, G), optional
    ``zero`` of the same shape as ``scale``, optional ``bias``. ``dtype`` is the compute dtype of
    the activations (fp32 or bf16).
    """

    weight_buffers = ("qweight",)  # counted as weights by LoadedModel.n_params
    conv1d = False  # it replaced GPT-2's Conv1D (set by .model, whose dequantize_model restores one)

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 kernels: RowKernels | None = None):
        super().__init__()
        self.kernels = kernels if kernels is not None else RowKernels()  # shared by a model's modules
        self.out_features, self.in_features = qt.q.shape
        self.granularity, self.group_size = qt.granularity, qt.group_size
        self.register_buffer("qweight", qt.q)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero", qt.zero)
        self.register_buffer("bias", bias)
        # 1/s for the row-wise kernel (a row or tensor statistic broadcast to (out, 1)).
        inv = (1.0 / qt.scale).expand(self.out_features, 1).contiguous() if qt.scale.shape[1] == 1 else None
        self.register_buffer("inv_scale", inv, persistent=False)
        zero_row = qt.zero.expand(self.out_features, 1).contiguous() if qt.zero is not None and inv is not None else None
        self.register_buffer("zero_row", zero_row, persistent=False)
        self.compute_dtype = dtype
        self._blocks: BlockCodes | bool | None = None  # block_weight(): None not built yet, False impossible

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized (out, in) weight, computed on each access (for code that reads ``.weight``)."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The de-quantized (out, in) weight ``(q - z) / s``."""
        qt = QuantizedTensor(self.qweight, self.scale, self.zero, self.granularity, self.group_size)
        return qt.dequantize(dtype or self.compute_dtype)

    def block_weight(self) -> BlockCodes | None:
        """The codes as Q8_0 blocks with the row scales (W8A8, module docstring) when the block kernels are
        chosen (:func:`kernel_choice`) and the weight allows it (absmax per row or tensor, a width that is a
        multiple of 32); else None. Repacked once, at the first call."""
        if kernel_choice() != "blocks" or self.inv_scale is None or self.zero is not None:
            return None
        if self._blocks is None:
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            self._blocks = q8_0_weight(self.qweight, self.inv_scale, bias) or False
        return self._blocks or None

    def decode_weight(self) -> BlockCodes | RowCodes | None:
        """The model runtime's compiled view (its ``DecodePlugin``): Q8_0 blocks with the row scales
        (:meth:`block_weight`, W8A8), else the int8 codes with 1/s and the zero point per row, de-quantized
        inside the step's loads; None for group-wise statistics, which it does not run (they take this
        module's own forward)."""
        if self.inv_scale is None:
            return None
        bw = self.block_weight()
        if bw is not None:
            return bw
        return RowCodes(self.qweight, self.inv_scale, self.zero_row, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bw = self.block_weight() if x2.shape[0] < BLOCK_GEMM_ROWS and not torch.is_grad_enabled() else None
        if bw is not None:
            y = project(bw, x2)
        elif x2.shape[0] == 1 and self.inv_scale is not None and not torch.is_grad_enabled():
            xf = x2[0].float().contiguous()
            if KernelOptions.detect().byte_words and self.in_features % 4 == 0 and self.qweight.is_contiguous():
                words, xq = self.qweight.view(torch.float32), xf.view(-1, 4).t().contiguous()
                y = (self.kernels("rowdot_words", words, self.inv_scale, xq) if self.zero is None
                     else self.kernels("rowdot_words_zero", words, self.inv_scale, self.zero_row, xq))
            elif self.zero is None:
                y = self.kernels("rowdot", self.qweight, self.inv_scale, xf)
            else:
                y = self.kernels("rowdot_zero", self.qweight, self.inv_scale, self.zero_row, xf)
            y = y.reshape(1, self.out_features).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.dequantize(x.dtype), self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.granularity == "group" else ""
        kind = "zeropoint" if self.zero is not None else "absmax"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind} per "
                f"{self.granularity}{g}, bias={self.bias is not None}")


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows: a lookup de-quantizes only the rows it returns.

    When the model ties its output head to this table, the head's :class:`Int8Linear` (or
    LLM.int8() linear) holds the very same ``qweight`` / ``scale`` tensors.
    """

    weight_buffers = ("qweight",)  # counted as weights by LoadedModel.n_params

    def __init__(self, qt: QuantizedTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qt.q.shape
        self.granularity, self.group_size = qt.granularity, qt.group_size
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qt.q)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero", qt.zero)
        self.compute_dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized (num_embeddings, dim) table, computed on each access (for code that reads
        ``.weight``, e.g. its dtype); lookups never build it."""
        return self.forward(torch.arange(self.num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight[flat].float()  # (n, dim)
        pick = (lambda t: t) if self.scale.shape[0] == 1 else (lambda t: t[flat])
        if self.zero is not None:
            rows = rows - expand_stat(pick(self.zero), self.embedding_dim, self.group_size)
        rows = rows / expand_stat(pick(self.scale), self.embedding_dim, self.group_size)
        return rows.to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per {self.granularity}"
