"""NF4: the 4-bit NormalFloat data type of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs"), with blocks of 64 and double quantization of the scales, as a frozen base for LoRA.

The code book: 16 values ``q_i`` that are quantiles of N(0, 1), normalised to [-1, 1], with an exact zero.
The paper builds it asymmetrically (8 positive and 7 negative quantiles plus zero) from

    q_i = 1/2 (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1)))

and bitsandbytes' ``create_normal_map(offset=0.9677)`` evaluates ``Q_X = Phi^-1`` at
``linspace(offset, 1/2, 9)`` (positive half) and ``linspace(offset, 1/2, 8)`` (negative half), then divides
by the largest value. :func:`nf4_code_book` recomputes it that way; :data:`NF4_CODE` is the table printed
in the paper's appendix (and bitsandbytes' source), which the tests compare against.

Quantization of a weight ``W`` (flattened into blocks of 64):

    c_b = max_j |W_bj|          (absmax of block b, one per 64 weights)
    code_bj = argmin_i |W_bj / c_b - q_i|    (4 bits, two codes per byte)

Double quantization (DQ): the fp32 absmax values ``c`` are themselves quantized: their mean ``m`` is
subtracted and ``c - m`` is stored as 8-bit floats (float8 e4m3) in blocks of 256, each block with one fp32
scale ``s = max|c - m| / 448``. Bits per weight: 4 + 8/64 + 32/(64*256) = 4.127 (without DQ: 4.5).

De-quantization: ``W'_bj = q[code_bj] * c'_b`` with ``c'_b = fp8(c_b - m) * s + m``.

:class:`NF4Linear` keeps only the codes and the quantized scales; its forward de-quantizes the weight,
multiplies, and drops it. The backward de-quantizes again instead of keeping the fp32 weight alive
(a custom autograd function), so the memory of a frozen base is the 4-bit one during training too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # weights per absmax block (QLoRA)
DQ_BLOCK = 256  # absmax values per second-level block (QLoRA's double quantization)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# The NF4 code book as printed in the QLoRA paper's appendix E (and bitsandbytes' functional.py).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)


def nf4_code_book(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values computed from normal quantiles (bitsandbytes' ``create_normal_map``)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.max()).to(torch.float32)


@dataclass
class NF4Tensor:
    """A weight in NF4 with double-quantized absmax scales (all tensors are buffers of :class:`NF4Linear`)."""

    codes: torch.Tensor  # (n/2,) uint8: two 4-bit codes per byte, high nibble first
    absmax_q: torch.Tensor  # (n_blocks,) float8 e4m3: (c - mean) / dq_scale
    dq_scale: torch.Tensor  # (n_blocks / 256,) fp32
    absmax_mean: torch.Tensor  # () fp32
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax_q, self.dq_scale, self.absmax_mean))


def quantize_absmax(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the block absmax values: (fp8 codes, fp32 scale per 256, fp32 mean)."""
    mean = c.mean()
    x = c - mean
    n = x.numel()
    pad = (-n) % DQ_BLOCK
    blocks = F.pad(x, (0, pad)).view(-1, DQ_BLOCK)  # (n2, 256)
    scale = blocks.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX  # (n2,)
    q = (blocks / scale[:, None]).to(FP8).view(-1)[:n]
    return q, scale, mean


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax values back from their fp8 codes."""
    n = q.numel()
    pad = (-n) % DQ_BLOCK
    x = F.pad(q.to(torch.float32), (0, pad)).view(-1, DQ_BLOCK) * scale[:, None]
    return x.view(-1)[:n] + mean


def quantize_nf4(w: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """``w`` (any shape, numel a multiple of 64) -> :class:`NF4Tensor` (nearest code book value per weight)."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights, got {w.numel()}")
    blocks = w.detach().to(torch.float32).reshape(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / absmax.clamp_min(1e-12)[:, None]
    # nearest code: midpoints between sorted code values, then bucketize
    mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    idx = torch.bucketize(normed.reshape(-1), mid).to(torch.uint8)  # (n,)
    codes = (idx[0::2] << 4) | idx[1::2]
    if double_quant:
        q, scale, mean = quantize_absmax(absmax)
    else:  # keep fp32 absmax: stored in the fp8 slot's place as fp32 with unit scale
        q, scale, mean = absmax, torch.ones(1), torch.zeros(())
    return NF4Tensor(codes, q, scale, mean, tuple(w.shape))


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:class:`NF4Tensor` -> the de-quantized weight in its original shape."""
    idx = torch.stack([t.codes >> 4, t.codes & 0xF], dim=1).reshape(-1).long()  # (n,)
    if t.absmax_q.dtype == FP8:
        absmax = dequantize_absmax(t.absmax_q, t.dq_scale, t.absmax_mean)
    else:
        absmax = t.absmax_q.to(torch.float32)
    w = NF4_CODE[idx].view(-1, BLOCK) * absmax[:, None]  # (n_blocks, 64)
    return w.view(t.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """``y = x W'^T`` with ``W'`` de-quantized in the forward and again in the backward (never saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Linear):
    """A frozen linear layer stored in NF4 (codes + double-quantized scales as buffers).

    It subclasses ``nn.Linear`` (without a ``weight`` parameter) so that PEFT wraps it with its LoRA
    ``Linear`` like any linear layer; ``W_q`` and :meth:`dequantize` are the names PEFT looks for on a
    quantized base (it calls ``dequantize()`` for DoRA's weight norm and for merging).
    """

    weight_buffers = ("W_q",)

    def __init__(self, linear: nn.Linear, double_quant: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        t = quantize_nf4(linear.weight, double_quant)
        self.register_parameter("weight", None)
        self.register_buffer("W_q", t.codes)
        self.register_buffer("absmax_q", t.absmax_q)
        self.register_buffer("dq_scale", t.dq_scale)
        self.register_buffer("absmax_mean", t.absmax_mean)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.W_q, self.absmax_q, self.dq_scale, self.absmax_mean, (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``."""
        return dequantize_nf4(self.nf4(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self) if torch.is_grad_enabled() else x @ self.dequantize(x.dtype).t()
        return y + self.bias if self.bias is not None else y

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the de-quantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data = self.dequantize()
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocks of {BLOCK}"


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, each tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
