"""The k-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (super-blocks of 256 values).

Source: ``ggml/src/ggml-quants.c`` (``quantize_row_q2_K_ref`` ... ``quantize_row_q6_K_ref``, the
``quantize_row_qX_K_impl`` functions used when an importance matrix is given, and the
``dequantize_row_qX_K`` functions); k-quants were introduced in llama.cpp PR #1684 (Kawrakow, 2023).

A super-block of 256 values is split into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K).
Each sub-block j gets its own scale ``d_j`` (and for Q2_K / Q4_K / Q5_K a min ``m_j``), found by a
weighted search (``searches.py``). The sub-block scales are themselves quantized against one fp16
super-scale: ``d_j = d * sc_j`` with ``sc_j`` a 4-bit (Q2_K), 6-bit (Q3_K, Q4_K, Q5_K) or 8-bit
(Q6_K) integer. Finally each value is re-quantized with the scale it will really be decoded with:

    Q2_K  q in 0..3   x ~ d sc_j q - dmin mc_j      (sc_j, mc_j 4-bit)      2.625 bits/weight
    Q3_K  q in -4..3  x ~ d (sc_j - 32) q           (sc_j 6-bit)            3.4375
    Q4_K  q in 0..15  x ~ d sc_j q - dmin mc_j      (sc_j, mc_j 6-bit)      4.5
    Q5_K  q in 0..31  x ~ d sc_j q - dmin mc_j      (sc_j, mc_j 6-bit)      5.5
    Q6_K  q in -32..31 x ~ d sc_j q                 (sc_j int8)             6.5625

Searches. Without an importance matrix (ggml's ``_ref`` path): Q2_K uses ``make_qkx2_quants``
with w = |x| and absolute error; Q4_K / Q5_K ``make_qkx2_quants`` with w = sqrt(mean x^2) + |x|;
Q3_K ``make_q3_quants``; Q6_K ``make_qx_quants`` with w = x^2; the sub-block scales are then
rounded linearly against the largest. With an importance matrix ``qw``: w = qw sqrt(sigma2 + x^2)
(sigma2 = mean x^2 of the super-block, doubled for Q3_K / Q4_K / Q5_K), ``make_qkx3_quants`` /
``make_qx_quants`` per sub-block, and the sub-block scales themselves are fitted by a weighted
search (``make_qp_quants``, or ``make_qx_quants`` for Q3_K's signed scales); Q6_K uses qw alone.

Arrays are element-major inside: a super-block is a column of a (256, N) array, so sums over
its values in C's order are vector additions over all super-blocks at once.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from llmcourse.quant.gguf.blocks import QK_K, BlockQuant, join_fields, split_fields
from llmcourse.quant.gguf.searches import (
    F32,
    first_absmax,
    fp16,
    imatrix_weights,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    nearest_int_,
    seq_sum,
)

# ----------------------------------------------------------------------------- layout helpers


def _columns(blocks: np.ndarray) -> np.ndarray:
    """(N, 256) super-blocks -> (256, N) element-major."""
    return np.ascontiguousarray(blocks.T)


def _sub(x: np.ndarray, size: int) -> np.ndarray:
    """(256, N) -> (size, 256/size * N): one column per sub-block, column index j * N + b."""
    n_sub = QK_K // size
    return np.ascontiguousarray(x.reshape(n_sub, size, -1).transpose(1, 0, 2).reshape(size, -1))


def _unsub(v: np.ndarray, size: int) -> np.ndarray:
    """Inverse of :func:`_sub`: (size, n_sub * N) -> (256, N)."""
    n_sub = QK_K // size
    return v.reshape(size, n_sub, -1).transpose(1, 0, 2).reshape(QK_K, -1)


def _per_value(v: np.ndarray, size: int) -> np.ndarray:
    """Per-sub-block values (n_sub, N) -> per-value (256, N)."""
    return np.repeat(v, size, axis=0)


def _crumbs(L: np.ndarray) -> np.ndarray:
    """(256, N) values 0..3 -> (N, 64) bytes: qs[32 h + l] = L[128 h + l] | L[+32] << 2 | L[+64] << 4 | L[+96] << 6."""
    q = L.astype(np.uint8).reshape(2, 4, 32, -1)  # (half, shift, l, N)
    out = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)  # (2, 32, N)
    return out.reshape(64, -1).T


def _uncrumbs(qs: np.ndarray) -> np.ndarray:
    """(N, 64) bytes -> (N, 256) values 0..3 (inverse of :func:`_crumbs`)."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, QK_K)


def _nibble_pairs(L: np.ndarray) -> np.ndarray:
    """(256, N) values 0..15 -> (N, 128): qs[32 c + l] = L[64 c + l] | L[64 c + 32 + l] << 4."""
    q = L.astype(np.uint8).reshape(4, 2, 32, -1)
    return (q[:, 0] | (q[:, 1] << 4)).reshape(128, -1).T


def _unnibble_pairs(qs: np.ndarray) -> np.ndarray:
    """(N, 128) -> (N, 256) values 0..15."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, QK_K)


def _requantize(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, size: int,
                lo: int, hi: int) -> np.ndarray:
    """``l = clip(nearest_int((x + dm_j) / d_j), lo, hi)``; sub-blocks with d_j == 0 keep L.

    x, L: (256, N); d, dm: (n_sub, N) float32. Returns integer quants (256, N).
    """
    dv = _per_value(d, size)
    num = x if dm is None else x + _per_value(dm, size)
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(nearest_int(num / dv), lo, hi)
    return np.where(dv != 0, l, L.astype(np.int32))


def _requantize_cols(xs: np.ndarray, L: np.ndarray, d: np.ndarray, lo: F32, hi: F32,
                     off: F32) -> np.ndarray:
    """:func:`_requantize` in the sub-block layout, plus ``off``, as uint8: xs, L (size, M) with
    L already offset; d (M,) the scale of each column. ``clip(nearest_int(x / d), lo, hi) + off``,
    columns with d == 0 keep L."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.divide(xs, d)
    nearest_int_(v)
    np.clip(v, lo, hi, out=v)
    v += off
    zero = d == 0
    if zero.any():
        v[:, zero] = L[:, zero]
    return v.astype(np.uint8)


def _q3_bits(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(256, N) C-contiguous uint8 values 0..7 -> hmask (N, 32) and qs (N, 64), like the C
    loops: the high bit of value 32 j + l goes to bit j of hmask[l], the low two bits as in
    :func:`_crumbs`. Works on 8 bytes at a time (uint64 views; no shift crosses a byte)."""
    N = q.shape[1]
    q8 = q.reshape(8, 32 * N).view(np.uint64)  # (8, 4N): row j = values 32 j .. 32 j + 31
    ones = np.uint64(0x0101010101010101)
    h = (q8 >> np.uint64(2)) & ones
    hm = h[0].copy()
    for j in range(1, 8):
        hm |= h[j] << np.uint64(j)
    c = (q.reshape(2, 4, 32 * N).view(np.uint64)) & (ones * np.uint64(3))  # (2, 4, 4N)
    qs = c[:, 0] | (c[:, 1] << np.uint64(2)) | (c[:, 2] << np.uint64(4)) | (c[:, 3] << np.uint64(6))
    return hm.view(np.uint8).reshape(32, N).T, qs.view(np.uint8).reshape(64, N).T


# ----------------------------------------------------------------------------- 6-bit scale packing

def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 scales and 8 mins (6 bits each, given as (8, N) ints) -> (N, 12) bytes.

    bytes 0-3: scale j | (high 2 bits of scale j+4) << 6;  4-7: min j | (high bits of min j+4) << 6;
    8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4. Emulates C's uint8_t truncations.
    """
    ls = ls.astype(np.int32) & 0xFF
    lm = lm.astype(np.int32) & 0xFF
    s = np.zeros((12, ls.shape[1]), dtype=np.int32)
    s[0:4] = ls[0:4]
    s[4:8] = lm[0:4]
    s[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    s[0:4] |= (ls[4:8] >> 4) << 6
    s[4:8] |= (lm[4:8] >> 4) << 6
    return (s & 0xFF).astype(np.uint8).T


def _unpack_scales_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``get_scale_min_k4`` for j = 0..7: (N, 12) bytes -> scales, mins (8, N) as int32."""
    q = scales.T.astype(np.int32)
    sc = np.concatenate([q[0:4] & 63, (q[8:12] & 0xF) | ((q[0:4] >> 6) << 4)])
    mn = np.concatenate([q[4:8] & 63, (q[8:12] >> 4) | ((q[4:8] >> 6) << 4)])
    return sc, mn


def _pack_scales_q3(l: np.ndarray) -> np.ndarray:
    """Q3_K: 16 scales of 6 bits (16, N) -> (N, 12) bytes: low nibbles in bytes 0-7 (j and j+8),
    the high 2 bits of scale j in byte 8 + j % 4 at bit 2 (j // 4)."""
    l = l.astype(np.int32)
    s = np.zeros((12, l.shape[1]), dtype=np.int32)
    s[0:8] = (l[0:8] & 0xF) | ((l[8:16] & 0xF) << 4)
    hi = l >> 4
    for j in range(16):
        s[8 + j % 4] |= hi[j] << (2 * (j // 4))
    return (s & 0xFF).astype(np.uint8).T


def _unpack_scales_q3(scales: np.ndarray) -> np.ndarray:
    """(N, 12) bytes -> the 16 signed scales sc_j - 32 as (16, N) int32."""
    q = scales.T.astype(np.int32)
    low = np.concatenate([q[0:8] & 0xF, q[0:8] >> 4])
    j = np.arange(16)
    high = (q[8 + j % 4] >> (2 * (j // 4))[:, None]) & 3
    return (low | (high << 4)) - 32


def _max_positive(v: np.ndarray) -> np.ndarray:
    """``float m = 0; for j: if (v[j] > m) m = v[j];`` over axis 0."""
    m = v.max(axis=0)
    return np.where(m > 0, m, F32(0))


def _sigma2(x: np.ndarray, factor: int) -> np.ndarray:
    """factor * (sum of x^2 over the super-block, in C's order) / 256."""
    return F32(factor) * seq_sum(x * x) / F32(QK_K)


# ----------------------------------------------------------------------------- the types

class Q2_K(BlockQuant, qtype=T.Q2_K):
    """2-bit quants with 4-bit scales and mins per 16 values."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        x = _columns(blocks)
        N = x.shape[1]
        xs = _sub(x, 16)
        if qw is None:
            scales, mins, L = make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.reshape(16, N), mins.reshape(16, N)
            max_scale, max_min = _max_positive(scales), _max_positive(mins)
            with np.errstate(divide="ignore", invalid="ignore"):
                ls = np.where(max_scale > 0, nearest_int((F32(15) / max_scale) * scales), 0)
                lm = np.where(max_min > 0, nearest_int((F32(15) / max_min) * mins), 0)
            sc = (ls | (lm << 4)) & 0xFF
            d = fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
            dmin = fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
        else:
            w = imatrix_weights(x, _columns(qw), _sigma2(x, 1))
            ws = _sub(w, 16)
            sw = seq_sum(ws).reshape(16, N)
            scales, mins, L = make_qkx_quants(xs, ws, 3, -0.9, 0.05, 36, use_mad=False)
            dm, Ls = make_qp_quants(scales.reshape(16, N), 15, sw)
            mm, Lm = make_qp_quants(mins.reshape(16, N), 15, sw)
            d, dmin = fp16(dm), fp16(mm)
            sc = (Ls.astype(np.int32) | (Lm.astype(np.int32) << 4)) & 0xFF
        dj = d.astype(F32) * (sc & 0xF).astype(F32)
        mj = dmin.astype(F32) * (sc >> 4).astype(F32)
        q = _requantize(x, _unsub(L, 16), dj, mj, 16, 0, 3)
        return join_fields(cls.layout, out, scales=sc.astype(np.uint8).T, qs=_crumbs(q), d=d, dmin=dmin)

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        # (N, 16): sub-block j covers values 16 j .. 16 j + 15
        ml = f["dmin"].astype(F32)[:, None] * (f["scales"] >> 4).astype(F32)
        dl = f["d"].astype(F32)[:, None] * (f["scales"] & 0xF).astype(F32)
        q = _uncrumbs(f["qs"]).astype(F32)
        return (np.repeat(dl, 16, axis=1) * q) - np.repeat(ml, 16, axis=1)


class Q3_K(BlockQuant, qtype=T.Q3_K):
    """3-bit quants (2 low bits + a high-bit mask) with signed 6-bit scales per 16 values."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        N = blocks.shape[0]
        if qw is None:
            # everything in the sub-block layout: one transpose in, one (of bytes) out
            xs = np.ascontiguousarray(blocks.reshape(N, 16, 16).transpose(2, 1, 0)).reshape(16, 16 * N)
            scales, L = make_q3_quants(xs, 4)
            scales = scales.reshape(16, N)
            max_scale = first_absmax(scales)
            nz = max_scale != 0
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = F32(-32) / max_scale
                l = np.clip(nearest_int(iscale * scales), -32, 31) + 32
                d = fp16(np.where(nz, F32(1) / iscale, F32(0)))
            packed = np.where(nz[:, None], _pack_scales_q3(l), 0).astype(np.uint8)
            # the scales as unpacked from the bytes: l - 32 (0..63 round-trips), -32 where all zero
            dj = d.astype(F32) * np.where(nz, l - 32, -32).astype(F32)
            q = _requantize_cols(xs, L, dj.reshape(-1), F32(-4), F32(3), F32(4))  # 0..7, uint8
            hmask, qs = _q3_bits(np.ascontiguousarray(_unsub(q, 16)))
            return join_fields(cls.layout, out, hmask=hmask, qs=qs, scales=packed, d=d)
        x = _columns(blocks)
        xs = _sub(x, 16)
        w = imatrix_weights(x, _columns(qw), _sigma2(x, 2))
        ws = _sub(w, 16)
        sw = seq_sum(ws).reshape(16, N)
        scales, L = make_qx_quants(xs, 4, ws)
        d_block, Ls = make_qx_quants(scales.reshape(16, N), 32, sw)
        packed = _pack_scales_q3(Ls)
        d = fp16(d_block)
        dj = d.astype(F32) * _unpack_scales_q3(packed).astype(F32)
        q = _requantize(x, _unsub(L, 16) - 4, dj, None, 16, -4, 3) + 4  # 0..7
        hmask = np.packbits((q >> 2).astype(np.uint8).reshape(8, 32, N).transpose(2, 1, 0), axis=2,
                            bitorder="little").reshape(N, 32)
        return join_fields(cls.layout, out, hmask=hmask, qs=_crumbs(q & 3), scales=packed, d=d)

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        N = raw.shape[0]
        sc = _unpack_scales_q3(f["scales"]).T.astype(F32)  # (N, 16)
        dl = f["d"].astype(F32)[:, None] * sc
        high = np.unpackbits(f["hmask"].reshape(N, 32, 1), axis=2, bitorder="little")  # (N, 32, 8)
        high = high.transpose(0, 2, 1).reshape(N, QK_K)
        q = _uncrumbs(f["qs"]).astype(np.int32) - np.where(high != 0, 0, 4)
        return np.repeat(dl, 16, axis=1) * q.astype(F32)


def _q45_quantize(cls, blocks, qw, nmax: int, ref_search: tuple[float, float, int]) -> tuple:
    """Shared by Q4_K (nmax 15) and Q5_K (nmax 31): fp16 d, dmin, packed scales, quants (256, N)."""
    x = _columns(blocks)
    N = x.shape[1]
    xs = _sub(x, 32)
    if qw is None:
        av_x = np.sqrt(seq_sum(xs * xs) / F32(32))
        scales, mins, L = make_qkx_quants(xs, av_x + np.abs(xs), nmax, *ref_search, use_mad=False)
        scales, mins = scales.reshape(8, N), mins.reshape(8, N)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        ls = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min * mins) & 0xFF)
        d, dmin = fp16(max_scale / F32(63)), fp16(max_min / F32(63))
    else:
        w = imatrix_weights(x, _columns(qw), _sigma2(x, 2))
        ws = _sub(w, 32)
        sw = seq_sum(ws).reshape(8, N)
        scales, mins, L = make_qkx_quants(xs, ws, nmax, -0.9, 0.05, 36, use_mad=False)
        d_block, ls = make_qp_quants(scales.reshape(8, N), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(8, N), 63, sw)
        if nmax == 31:  # Q5_K clamps (its C code has MIN(63, .)); Q4_K does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = fp16(d_block), fp16(m_block)
    packed = _pack_scales_k4(ls, lm)
    sc, mc = _unpack_scales_k4(packed)
    dj = d.astype(F32) * sc.astype(F32)
    mj = dmin.astype(F32) * mc.astype(F32)
    q = _requantize(x, _unsub(L, 32), dj, mj, 32, 0, nmax)
    return d, dmin, packed, q


def _q45_dequantize(f: dict, q: np.ndarray) -> np.ndarray:
    sc, mc = _unpack_scales_k4(f["scales"])
    dl = f["d"].astype(F32)[:, None] * sc.T.astype(F32)  # (N, 8)
    ml = f["dmin"].astype(F32)[:, None] * mc.T.astype(F32)
    return np.repeat(dl, 32, axis=1) * q.astype(F32) - np.repeat(ml, 32, axis=1)


class Q4_K(BlockQuant, qtype=T.Q4_K):
    """4-bit quants with 6-bit scales and mins per 32 values."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, dmin, packed, q = _q45_quantize(cls, blocks, qw, 15, (-1.0, 0.1, 20))
        return join_fields(cls.layout, out, d=d, dmin=dmin, scales=packed, qs=_nibble_pairs(q))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        return _q45_dequantize(f, _unnibble_pairs(f["qs"]))


class Q5_K(BlockQuant, qtype=T.Q5_K):
    """5-bit quants (4 low bits + 1 high bit) with 6-bit scales and mins per 32 values."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        d, dmin, packed, q = _q45_quantize(cls, blocks, qw, 31, (-0.5, 0.1, 15))
        N = q.shape[1]
        # qh[l] bit 2c = high bit of value 64 c + l, bit 2c + 1 = high bit of value 64 c + 32 + l
        hb = (q >> 4).astype(np.uint8).reshape(8, 32, N).transpose(2, 1, 0)  # (N, l, 2c + half)
        qh = np.packbits(hb, axis=2, bitorder="little").reshape(N, 32)
        return join_fields(cls.layout, out, d=d, dmin=dmin, scales=packed, qh=qh, qs=_nibble_pairs(q & 0x0F))

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        N = raw.shape[0]
        high = np.unpackbits(f["qh"].reshape(N, 32, 1), axis=2, bitorder="little")  # (N, l, 8)
        high = high.transpose(0, 2, 1).reshape(N, QK_K)
        return _q45_dequantize(f, _unnibble_pairs(f["qs"]) | (high << 4))


class Q6_K(BlockQuant, qtype=T.Q6_K):
    """6-bit quants (4 low + 2 high bits) with int8 scales per 16 values."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None, out=None):
        x = _columns(blocks)
        N = x.shape[1]
        xs = _sub(x, 16)
        scales, L = make_qx_quants(xs, 32, None if qw is None else _sub(_columns(qw), 16))
        scales = scales.reshape(16, N)
        max_scale = first_absmax(scales)
        zero = np.abs(max_scale) < F32(1e-15)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-128) / np.where(zero, F32(1), max_scale)
            sc = np.minimum(127, nearest_int(iscale * scales))  # stored as int8
            d = fp16(F32(1) / iscale)
        dj = d.astype(F32) * sc.astype(np.int8).astype(F32)
        q = _requantize(x, _unsub(L, 16) - 32, dj, None, 16, -32, 31) + 32  # 0..63
        qq = q.astype(np.uint8).reshape(2, 4, 32, N)  # (half, quarter, l, N)
        ql = np.concatenate([(qq[:, 0] & 0xF) | ((qq[:, 2] & 0xF) << 4),
                             (qq[:, 1] & 0xF) | ((qq[:, 3] & 0xF) << 4)], axis=1)  # (2, 64, N)
        qh = (qq[:, 0] >> 4) | ((qq[:, 1] >> 4) << 2) | ((qq[:, 2] >> 4) << 4) | ((qq[:, 3] >> 4) << 6)
        out = join_fields(cls.layout, out, ql=ql.reshape(128, N).T, qh=qh.reshape(64, N).T,
                          scales=sc.astype(np.int8).view(np.uint8).T, d=d)
        out[zero] = 0
        return out

    @classmethod
    def dequantize_blocks(cls, raw):
        f = split_fields(raw, cls.layout)
        N = raw.shape[0]
        ql = f["ql"].reshape(N, 2, 2, 32)  # (N, half, 32-byte group, l)
        qh = f["qh"].reshape(N, 2, 1, 32)
        low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = ((low | (high << 4)).astype(np.int32) - 32).reshape(N, QK_K).astype(F32)
        dsc = f["d"].astype(F32)[:, None] * f["scales"].view(np.int8).astype(F32)  # (N, 16)
        return np.repeat(dsc, 16, axis=1) * q
