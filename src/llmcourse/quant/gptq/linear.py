"""``GPTQLinear``: a linear layer that stores the standard packed GPTQ tensors and runs on a CPU.

It holds exactly the checkpoint's tensors (:mod:`llmcourse.quant.gptq.pack`) as buffers under
the checkpoint's names, so its ``state_dict`` is the file's. ``forward`` de-quantizes the weight
per group, ``W[o, i] = scales[g_idx[i], o] · (q[i, o] - zero[g_idx[i], o])``, then runs
``F.linear``; the unpacked codes and zeros are kept (int8, one byte per weight) after the first
call unless ``cache_codes=False``, so later calls only do the multiply-add of the de-quantization.

Fast decoding (the decoding lab's compiled step, its :class:`DecodePlugin` protocol):
:meth:`GPTQLinear.decode_parts` hands over the one-byte codes with scales and zeros for *equal*
groups of consecutive inputs, which the compiled reduction de-quantizes inside its loads (one byte
read per weight instead of four). GPTQ's groups need not be equal: a width that the group size does
not divide ends in a shorter group (576 inputs at g128: 4 groups of 128 and one of 64). With
``g_idx[i] = i // g`` (no act-order; also group-aware reordering) every run of ``s = gcd(g, I)``
inputs lies in one group, so the same values, repeated, are scales for ``I / s`` equal groups of
``s`` (576 at g128: 9 groups of 64). Under act-order ``g_idx`` is permuted and no such run exists:
the layer then offers nothing and the step runs it through its own ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        self._decode: tuple | None = None  # decode_parts(), built once

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

    def decode_parts(self) -> tuple | None:
        """The decoding lab's compiled-step view (``DecodePlugin``): ``(codes (O, I) int8, scale (O, G'),
        zero (O, G'), bias)`` with ``G' = I / gcd(g, I)`` equal groups (the scales and zeros of each
        group repeated over its runs), ``W[o, i] = (codes[o, i] - zero[o, i // (I / G')]) · scale[...]``;
        None under act-order. Built once, from the cached codes (``cache_codes``)."""
        if self._decode is None:
            s = self.equal_groups()
            if s is None:
                return None
            codes, scales, zeros, g_idx = self.parts()
            run_group = g_idx[::s]  # the group of each run of s inputs
            dtype = self.compute_dtype
            self._decode = (codes, scales[:, run_group].to(dtype).contiguous(),
                            zeros[:, run_group].to(dtype).contiguous(),
                            None if self.bias is None else self.bias.to(dtype))
        return self._decode

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight de-quantized per group."""
        codes, scales, zeros, g = self.parts()
        return (scales[:, g] * (codes.float() - zeros[:, g].float())).to(dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight, computed on each access (for code that reads ``.weight``)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        groups = self.scales.shape[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={groups}, bias={self.bias is not None}")
