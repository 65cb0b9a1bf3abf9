"""The standard GPTQ checkpoint layout ("gptq" v1, as AutoGPTQ wrote it and GPTQModel / transformers read it).

For a linear layer with ``I`` inputs, ``O`` outputs, ``G`` groups and ``bits`` in {2, 3, 4, 8}:

==========  ======================  =====  ====================================================
tensor      shape                   dtype  content
==========  ======================  =====  ====================================================
qweight     (I · bits / 32, O)      int32  codes ``q[i, o]`` packed along the inputs
qzeros      (G, O · bits / 32)      int32  ``zero - 1`` (the v1 convention) packed along outputs
scales      (G, O)                  fp16   per-group scale
g_idx       (I,)                    int32  the group of each input column
bias        (O,)                    fp16   when the layer has one
==========  ======================  =====  ====================================================

Packing: the ``bits``-bit values along the packed dimension form one little-endian bit stream,
cut into 32-bit words — value ``j`` occupies bits ``bits·j ... bits·j + bits - 1`` of the stream.
For 2, 4 and 8 bits this is "value ``j`` of a word at shift ``bits · j``"; for 3 bits, 32 values
fill exactly 3 words and values 10 and 21 straddle two words (AutoGPTQ's 3-bit loop, written as
one rule). De-quantization: ``W[o, i] = scales[g, o] · (q[i, o] - (qzeros[g, o] + 1))`` with
``g = g_idx[i]``.
"""

from __future__ import annotations

import torch

BITS = (2, 3, 4, 8)


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer ``values`` in [0, 2^bits) along ``dim`` into int32 words (``size · bits / 32`` of them)."""
    assert bits in BITS
    v = values.movedim(dim, 0).to(torch.int64)  # (n, ...)
    n = v.shape[0]
    assert (n * bits) % 32 == 0, f"{n} values of {bits} bits do not fill whole 32-bit words"
    rest = v.shape[1:]
    shifts = torch.arange(bits, dtype=torch.int64).reshape(1, bits, *([1] * len(rest)))
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(n * bits // 32, 32, *rest)  # bit stream, 32 per word
    weights = (torch.ones(1, dtype=torch.int64) << torch.arange(32)).reshape(1, 32, *([1] * len(rest)))
    words = (stream * weights).sum(1)  # (words, ...) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, signed
    return words.movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """The inverse of :func:`pack`: int32 words along ``dim`` -> int32 values in [0, 2^bits)."""
    assert bits in BITS
    w = words.movedim(dim, 0)
    maxq = 2**bits - 1
    if 32 % bits == 0:  # whole values per word: one shift per position
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(1, per, *([1] * (w.dim() - 1)))
        out = (w.unsqueeze(1) >> shifts) & maxq  # (words, per, ...)
        return out.reshape(w.shape[0] * per, *w.shape[1:]).movedim(0, dim).contiguous()
    rest = w.shape[1:]
    shifts = torch.arange(32, dtype=torch.int32).reshape(1, 32, *([1] * len(rest)))
    stream = ((w.unsqueeze(1) >> shifts) & 1).reshape(w.shape[0] * 32 // bits, bits, *rest)
    place = (torch.ones(1, dtype=torch.int32) << torch.arange(bits, dtype=torch.int32))
    out = (stream * place.reshape(1, bits, *([1] * len(rest)))).sum(1, dtype=torch.int32)
    return out.movedim(0, dim).contiguous()


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one layer from codes (O, I), scales / zeros (O, G) and g_idx (I,)."""
    maxq = 2**bits - 1
    out = {
        "qweight": pack(codes.t().contiguous(), bits, dim=0),  # (I·bits/32, O)
        "qzeros": pack((zeros.t().round().to(torch.int64) - 1) & maxq, bits, dim=1),  # (G, O·bits/32)
        "scales": scales.t().contiguous().to(torch.float16),  # (G, O)
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def unpack_layer(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (O, I), zeros (O, G) with the v1 "+1" applied, scales (O, G) fp32) of a packed layer."""
    codes = unpack(tensors["qweight"], bits, dim=0).t().contiguous()
    zeros = (unpack(tensors["qzeros"], bits, dim=1) + 1).t().contiguous()
    return codes, zeros, tensors["scales"].float().t().contiguous()


def dequantize_layer(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The (O, I) fp32 weight of a packed layer: ``scales[g] (q - zero[g])`` with ``g = g_idx[i]``."""
    codes, zeros, scales = unpack_layer(tensors, bits)
    g = tensors["g_idx"].long()
    return scales[:, g] * (codes - zeros[:, g]).float()
