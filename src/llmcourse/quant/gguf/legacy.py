"""The legacy ggml types: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (blocks of 32 values).

Source: ``ggml/src/ggml-quants.c`` (``quantize_row_q4_0_ref`` ... ``quantize_row_q8_0_ref`` and
``quantize_row_q4_0_impl`` ... ``quantize_row_q5_1_impl``), layouts in ``blocks.py``.

Without an importance matrix (the ``_ref`` functions):

    Q4_0  d = max / -8      q = min(15, trunc(x / d + 8.5))      x ~ d (q - 8)
    Q5_0  d = max / -16     q = min(31, trunc(x / d + 16.5))     x ~ d (q - 16)
    Q4_1  d = (hi - lo)/15  q = min(15, trunc((x - lo)/d + 0.5)) x ~ d q + lo
    Q5_1  d = (hi - lo)/31  q = trunc((x - lo)/d + 0.5)          x ~ d q + lo
    Q8_0  d = amax / 127    q = roundf(x / d)                    x ~ d q

where ``max`` is the signed value of largest magnitude, so the extreme value maps exactly to the
end of the range that has one more level (-8 / -16). The scales are stored as fp16, but the quants
are computed with the float32 ``d`` (``x * (1/d)``), as ggml does.

With an importance matrix ``qw`` (one weight per column), each value gets the weight
``w = qw * sqrt(sigma2 + x^2)`` with ``sigma2`` the mean square of its whole row, and the scale
comes from a weighted search: ``make_qx_quants`` for Q4_0 / Q5_0, ``make_qkx3_quants`` (a scale
and a min) for Q4_1 / Q5_1 (see ``searches.py``). Q8_0 ignores the importance matrix.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmcourse.quant.gguf.blocks import QK, BlockQuant, join_fields, split_fields
from llmcourse.quant.gguf.searches import (
    F32,
    first_absmax,
    fp16,
    imatrix_weights,
    make_qkx_quants,
    make_qx_quants,
)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(N, 32) values 0..15 -> (N, 16) bytes: qs[j] = q[j] | q[j + 16] << 4."""
    q = q.astype(np.uint8, copy=False)
    return q[:, :16] + q[:, 16:] * np.uint8(16)  # (the bits are disjoint; uint8 + and * are faster than | <<)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(N, 32) values 0..31 -> (N, 4) bytes: bit k of the little-endian uint32 qh = bit 4 of q[k]."""
    return np.packbits(q.astype(np.uint8, copy=False) >> 4, axis=1, bitorder="little")


def _unpack(qs: np.ndarray, qh: np.ndarray | None = None) -> np.ndarray:
    """(N, 16) nibbles (+ (N, 4) high bits) -> (N, 32) integer quants."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
    if qh is not None:
        q |= np.unpackbits(qh, axis=1, bitorder="little").astype(np.int32) << 4
    return q


def _min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (N, 32) min and max. torch reduces along the short contiguous axis ~10x faster
    than numpy does; min and max are exact whatever the order."""
    t = torch.from_numpy(x)
    return t.amin(dim=1).numpy(), t.amax(dim=1).numpy()


def _times_rows(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x (N, 32) * s[:, None] in float32. torch broadcasts one value per short row ~3x faster
    than numpy; each product is one correctly rounded multiply either way."""
    return (torch.from_numpy(x) * torch.from_numpy(s)[:, None]).numpy()


def _symmetric(blocks: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None,
               half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0: (fp16 d, quants 0..2*half-1 as (N, 32))."""
    if qw is not None:
        assert sigma2 is not None
        x = np.ascontiguousarray(blocks.T)  # (32, N) for the search
        d, L = make_qx_quants(x, half, imatrix_weights(x, np.ascontiguousarray(qw.T), sigma2))
        return fp16(d), L.T.astype(np.uint8)
    d = first_absmax(blocks, axis=1, min_max=_min_max(blocks)) / F32(-half)
    with np.errstate(divide="ignore"):
        id_ = np.where(d != 0, F32(1) / d, F32(0))
    v = _times_rows(blocks, id_)
    v += F32(half + 0.5)
    # MIN(2 half - 1, (int8_t)v): v >= 0.5 here, so clipping at 2 half - 0.5 and truncating is the same
    q = np.clip(v, F32(0), F32(2 * half - 0.5), out=v).astype(np.uint8)
    return fp16(d), q


def _affine(blocks: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None,
            nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: (fp16 d, fp16 m, quants 0..nmax as (N, 32))."""
    if qw is not None:
        assert sigma2 is not None
        x = np.ascontiguousarray(blocks.T)
        w = imatrix_weights(x, np.ascontiguousarray(qw.T), sigma2)
        d, the_min, L = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, use_mad=False)
        return fp16(d), fp16(-the_min), L.T.astype(np.uint8)
    lo, hi = _min_max(blocks)
    d = (hi - lo) / F32(nmax)
    with np.errstate(divide="ignore"):
        id_ = np.where(d != 0, F32(1) / d, F32(0))
    v = (torch.from_numpy(blocks) - torch.from_numpy(lo)[:, None]).mul_(torch.from_numpy(id_)[:, None]).numpy()
    v += F32(0.5)
    if nmax == 15:  # MIN(15, (int8_t)v); Q5_1's C code has no MIN(31, .)
        np.clip(v, F32(0), F32(15.5), out=v)
    return fp16(d), fp16(lo), v.astype(np.uint8)


class Q4_0(BlockQuant, qtype=T.Q4_0):
    """4-bit, symmetric: x ~ d (q - 8)."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, q = _symmetric(blocks, qw, sigma2, 8)
        return join_fields(cls.layout, out, d=d, qs=_nibbles(q))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        return (_unpack(f["qs"]) - 8).astype(F32) * f["d"].astype(F32)[:, None]


class Q5_0(BlockQuant, qtype=T.Q5_0):
    """5-bit, symmetric: x ~ d (q - 16); the 5th bits in a uint32 ``qh``."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, q = _symmetric(blocks, qw, sigma2, 16)
        return join_fields(cls.layout, out, d=d, qh=_high_bits(q), qs=_nibbles(q & 0x0F))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        return (_unpack(f["qs"], f["qh"]) - 16).astype(F32) * f["d"].astype(F32)[:, None]


class Q4_1(BlockQuant, qtype=T.Q4_1):
    """4-bit with a min: x ~ d q + m."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, m, q = _affine(blocks, qw, sigma2, 15)
        return join_fields(cls.layout, out, d=d, m=m, qs=_nibbles(q))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        return _unpack(f["qs"]).astype(F32) * f["d"].astype(F32)[:, None] + f["m"].astype(F32)[:, None]


class Q5_1(BlockQuant, qtype=T.Q5_1):
    """5-bit with a min: x ~ d q + m."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, m, q = _affine(blocks, qw, sigma2, 31)
        return join_fields(cls.layout, out, d=d, m=m, qh=_high_bits(q), qs=_nibbles(q & 0x0F))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        q = _unpack(f["qs"], f["qh"]).astype(F32)
        return q * f["d"].astype(F32)[:, None] + f["m"].astype(F32)[:, None]


class Q8_0(BlockQuant, qtype=T.Q8_0):
    """8-bit, symmetric: x ~ d q, q = roundf(x / d) in [-127, 127]; no importance matrix."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        lo, hi = _min_max(blocks)
        amax = np.maximum(hi, -lo)
        amax = np.where(amax > 0, amax, F32(0))  # C's MAX(0, .) chain never yields -0
        d = amax / F32(127)
        with np.errstate(divide="ignore"):
            id_ = np.where(d != 0, F32(1) / d, F32(0))
        v = _times_rows(blocks, id_)  # float32, as in C
        # roundf (half away from zero), exactly: in float64, v +- 0.5 is exact and the cast truncates
        v64 = v.astype(np.float64)
        v64 += np.copysign(0.5, v)
        q = v64.astype(np.int8)
        return join_fields(cls.layout, out, d=fp16(d), qs=q.view(np.uint8))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        return f["qs"].view(np.int8).astype(F32) * f["d"].astype(F32)[:, None]


assert QK == 32
