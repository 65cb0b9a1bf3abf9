"""LLM.int8(): vector-wise int8 matrix multiplication with mixed-precision decomposition.

Paper: T. Dettmers, M. Lewis, Y. Belkada, L. Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication
for Transformers at Scale" (NeurIPS 2022), section 3. For activations ``X`` (N, in) and a weight
``W`` (out, in) (the paper's ``W`` is (in, out): its "columns" are our rows):

1. Outlier feature columns ``O = {h : max_n |X_nh| >= threshold}`` (threshold 6.0 by default).
2. Vector-wise quantization of the rest: one absmax per row of ``X`` over the columns not in
   ``O``, ``c_x[n] = max_{h not in O} |X_nh|``, and one per output row of ``W``,
   ``c_w[o] = max_h |W_oh|``; ``X_i8 = round(127 X / c_x)``, ``W_i8 = round(127 W / c_w)``.
3. ``Y = (X_i8 W_i8^T) * (c_x c_w^T) / 127^2  +  X[:, O] W'[:, O]^T``: an int8 x int8 -> int32
   product (``torch._int_mm``) rescaled by the outer product of the statistics, plus the
   outlier columns multiplied in floating point.

As bitsandbytes does with ``has_fp16_weights=False``, only ``W_i8`` and ``c_w`` are stored, and
the weight columns of the outliers are de-quantized from them (``W' = W_i8 c_w / 127``). Two
small differences from bitsandbytes 0.50: it computes ``c_x`` after zeroing only the outlier
*elements* (so a column's non-outlier values still count in its rows' absmax) and casts the
activations to fp16 first; it also rescales by the constant 6.200124e-05 where 1/127^2 is
6.2000124e-05. We follow the paper (whole columns out; fp32) and use 1/127^2.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from llmcourse.quant.int8.formulas import QuantizedTensor

INV_127_SQ = 1.0 / (127.0 * 127.0)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the feature columns of ``x`` (N, in) holding any ``|x| >= threshold`` (sorted)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).reshape(-1)


def vectorwise_quantize(x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of ``x`` (N, in) with the columns ``cols`` set to zero.

    Returns ``(x_i8, c_x)``: codes (N, in) and the per-row absmax (N, 1); an all-zero row gets
    ``c_x = 1`` (codes 0).
    """
    xf = x.float()
    if cols.numel():
        xf = xf.clone()
        xf[:, cols] = 0.0
    c_x = xf.abs().amax(dim=1, keepdim=True)
    c_x = torch.where(c_x > 0, c_x, torch.ones_like(c_x))
    return torch.round(xf * (127.0 / c_x)).clamp_(-127, 127).to(torch.int8), c_x


# fp32 holds every integer below 2^24 exactly; a chunk of K int8 x int8 products sums to at most
# K * 127^2, so chunks of 1024 inputs (16.5 M) are summed exactly in any order.
_EXACT_CHUNK = 1024


@functools.lru_cache(maxsize=1)
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` is exact on this CPU, probed once on worst-case codes.

    oneDNN's int8 GEMM on x86 CPUs without VNNI (AVX2 or AVX-512 without VNNI) multiplies
    through ``vpmaddubsw``, whose pairwise int16 sums saturate: measured here with
    ``ONEDNN_MAX_CPU_ISA=AVX2``, an error of 283,334 on a 1536-wide product of codes near +-127
    (and a perplexity 0.5% off for the default model). With VNNI it is exact."""
    a = torch.full((4, 256), 127, dtype=torch.int8)
    a[1::2] = -127
    b = torch.full((8, 256), 127, dtype=torch.int8)
    b[1::2] = -127
    try:
        y = torch._int_mm(a, b.t())
    except RuntimeError:
        return False
    return torch.equal(y.long(), a.long() @ b.long().t())


def _chunked_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (N, in) x int8 (out, in)^T -> int32 through fp32 products of 1024-input chunks."""
    y = None
    for k in range(0, a.shape[1], _EXACT_CHUNK):
        part = (a[:, k:k + _EXACT_CHUNK].float() @ b[:, k:k + _EXACT_CHUNK].float().t()).to(torch.int32)
        y = part if y is None else y.add_(part)
    return y


def _best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def use_int_mm() -> bool:
    """Whether :func:`int8_matmul` should call ``torch._int_mm``: it is exact here
    (:func:`int_mm_is_exact`) and not slower than the fp32 chunks on a product of a 135M model's size.

    Exact is not enough: where oneDNN has no int8 kernel for the CPU (no VNNI: torch 2.13 on an AVX2
    CPU, 2026-12-07), ``_int_mm`` falls back to ATen's scalar loops, exact but about 20x slower than fp32
    (``llmcourse eval perplexity`` of an LLM.int8() folder took over 25 minutes against a minute). The
    same loops run with ``torch.backends.mkldnn.enabled = False``, which ``bench/int8.py`` uses to
    reproduce that CPU. ``LLMCOURSE_INT_MM=0/1`` overrides the probe."""
    forced = os.environ.get("LLMCOURSE_INT_MM")
    if forced in ("0", "1"):
        return forced == "1" and int_mm_is_exact()
    if not int_mm_is_exact():
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (576, 576), dtype=torch.int8, generator=g)
    return _best_seconds(lambda: torch._int_mm(a, b.t())) <= _best_seconds(lambda: _chunked_fp32(a, b))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 (N, in) x int8 (out, in)^T -> int32 (N, out).

    ``torch._int_mm`` where it is exact and fast (:func:`use_int_mm`); elsewhere fp32 products over
    chunks of 1024 inputs, each exact, added in int32."""
    if use_int_mm():
        return torch._int_mm(a, b.t())
    return _chunked_fp32(a, b)


def llm_int8_matmul(x: torch.Tensor, w_i8: torch.Tensor, c_w: torch.Tensor, threshold: float = 6.0,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() product ``x W^T (+ bias)`` for ``x`` (N, in) and a row-wise int8 weight.

    ``c_w`` (out, 1) is the weight's per-row absmax. Returns ``(y, outlier_cols)`` with ``y`` fp32.
    """
    cols = outlier_columns(x, threshold)
    x_i8, c_x = vectorwise_quantize(x, cols)
    y = int8_matmul(x_i8, w_i8).float() * (c_x * c_w.reshape(1, -1)) * INV_127_SQ
    if cols.numel():
        w_out = w_i8[:, cols].float() * (c_w * (1.0 / 127.0))  # (out, |O|) de-quantized weight columns
        y = y.addmm(x[:, cols].float(), w_out.t())
    if bias is not None:
        y = y + bias.float()
    return y, cols


class LLMInt8Linear(nn.Module):
    """An ``nn.Linear`` replacement running LLM.int8(); stores the int8 weight and its row scales.

    Buffers: ``qweight`` int8 (out, in) and ``scale`` fp32 (out, 1), the absmax-per-row scale
    ``s = 127 / c_w`` of :mod:`llmcourse.quant.int8.formulas` (so ``c_w = 127 / s``), optional ``bias``.
    ``last_outliers`` keeps the outlier columns of the latest call (for plots and tests).
    """

    weight_buffers = ("qweight",)  # counted as weights by LoadedModel.n_params
    conv1d = False  # it replaced GPT-2's Conv1D (set by .model, whose dequantize_model restores one)

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None, threshold: float = 6.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        assert qt.zero is None and qt.scale.shape == (qt.q.shape[0], 1), "LLM.int8() weights are absmax per row"
        self.out_features, self.in_features = qt.q.shape
        self.threshold = float(threshold)
        self.register_buffer("qweight", qt.q)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("bias", bias)
        self.register_buffer("absmax", 127.0 / qt.scale, persistent=False)  # c_w
        self.compute_dtype = dtype
        self.last_outliers: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y, cols = llm_int8_matmul(x.reshape(-1, self.in_features), self.qweight, self.absmax, self.threshold, self.bias)
        self.last_outliers = cols
        return y.to(x.dtype).reshape(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized (out, in) weight, computed on each access (for code that reads ``.weight``)."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the int8 path represents: ``W' = W_i8 c_w / 127``."""
        return (self.qweight.float() / self.scale).to(dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold:g}, bias={self.bias is not None}")

