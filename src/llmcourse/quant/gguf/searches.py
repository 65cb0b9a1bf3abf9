"""ggml's float32 primitives and scale searches, vectorised over blocks.

Source: ``ggml/src/ggml-quants.c`` (llama.cpp as vendored by llama-cpp-python 0.3.36):
``nearest_int``, ``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``,
``make_qkx3_quants`` and ``make_qp_quants``. Each search looks for the scale ``d`` (and min ``m``)
of one small group ``x`` of ``n`` values that minimises a weighted error

    symmetric:   sum_i w_i (x_i - d * l_i)^2,          l_i = round(x_i / d) clipped to [-nmax, nmax-1]
    with a min:  sum_i w_i (x_i - (d * l_i - m))^2,    l_i = round((x_i + m) / d) clipped to [0, nmax]

by trying a fixed ladder of candidate inverse scales (``(nmax + 0.1 * is) / max`` and the like)
and, for each candidate's integers ``l``, the closed-form least-squares fit

    d = sum w l x / sum w l^2                                   (symmetric)
    d = (S_w S_xl - S_x S_l) / D,  m = (S_l2 S_x - S_l S_xl) / D,   D = S_w S_l2 - S_l^2

Bit-exactness. ``libggml-base.so`` is built for plain x86-64 (SSE2, no FMA, no fast-math), so
every C expression is a chain of correctly rounded float32 operations in source order. We repeat
exactly those operations in numpy float32: products in C's left-to-right order (``w*x*l`` is
``(w*x)*l``), sums strictly sequential (``seq_sum``), and ``nearest_int``'s 1.5 * 2^23 trick
(round half to even) -- ``np.rint`` is the same wherever the argument is known to be below 2^22.

Layout. Every function takes groups *element-major*: ``x`` has shape (n, N), one column per
group, so a sequential sum over the n elements of all N groups is n vector additions. A group's
candidates depend on the previous winner (``min`` moves in make_qkx2/3_quants), so candidates run
in a Python loop, each vectorised over all groups.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # below this amax a group counts as all zero
_NI_MAGIC = F32(12582912.0)  # nearest_int adds 1.5 * 2^23 ...
_NI_BIAS = 0x00400000  # ... and reads its low 23 bits, biased by 2^22


# ----------------------------------------------------------------------------- float32 primitives

def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 12582912.f (1.5 * 2^23), keep the low 22 mantissa bits.

    Equals round-half-to-even for |v| <= 2^22 and wraps like the C code beyond (int32 result).
    """
    bits = (np.asarray(v, dtype=F32) + _NI_MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - _NI_BIAS


def nearest_int_(v: np.ndarray) -> np.ndarray:
    """:func:`nearest_int` in place on a float32 array, as float32 (for any argument, like the C code).

    The same trick without leaving float32: keep the low 23 bits of ``v + 1.5 * 2^23`` as the
    mantissa of ``2^23 + that``, then subtract 1.5 * 2^23 again. Returns ``v``.
    """
    v += _NI_MAGIC
    b = v.view(np.int32)
    b &= 0x007FFFFF  # nearest_int(.) + 2^22 ...
    b |= 0x4B000000  # ... as the float 2^23 + that
    v -= _NI_MAGIC  # exactly nearest_int(.)
    return v


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero (exactly; ``floor(v + 0.5)`` is not)."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0))


def fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) -> float16."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def seq_sum(t: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """``float s = 0; for i: s += t[i]`` over axis 0 of (n, N) float32, in C's order.

    ``from_zero=False`` is ``float s = t[0]; for i >= 1: s += t[i]`` (differs only for -0).
    """
    if t.ndim == 2 and t.shape[1] >= 2 and t.flags.c_contiguous:
        # numpy reduces a C-contiguous (n, N) array over axis 0 row by row, s[j] += t[i, j] for
        # i = 0, 1, ... (its pairwise summation only applies along the contiguous axis, which is
        # why N == 1 takes the loop below); the tests check this bit for bit against ggml
        s = np.add.reduce(t, axis=0)
        return s + F32(0) if from_zero else s
    s = t[0] + F32(0) if from_zero else t[0].copy()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def first_absmax(x: np.ndarray, axis: int = 0,
                 min_max: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The signed value of largest magnitude along ``axis`` of a 2-D ``x`` (the first one on ties), like
    ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``.

    ``min_max``: the (min, max) along ``axis`` when the caller has them already (exact in any order).
    """
    lo, hi = min_max if min_max is not None else (x.min(axis=axis), x.max(axis=axis))
    m = np.where(hi > -lo, hi, lo)
    tie = (hi == -lo) & (hi != 0)  # +a and -a both present: the one that comes first wins
    if tie.any():
        idx = np.nonzero(tie)[0]
        sub = x[:, idx] if axis == 0 else x[idx]
        first = np.argmax(np.abs(sub), axis=axis)
        m[idx] = sub[first, np.arange(idx.size)] if axis == 0 else sub[np.arange(idx.size), first]
    return m


def imatrix_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """ggml's weights with an importance matrix: ``w = qw * sqrtf(sigma2 + x*x)``, x and qw
    value-major (block, N), sigma2 (N,)."""
    return qw * np.sqrt(sigma2[None, :] + x * x)


# ----------------------------------------------------------------------------- searches

def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (ggml ``make_qx_quants`` with rmse_type 1).

    x: (n, N) float32; qw: (n, N) weights or None for w = x^2. Returns the scale (N,) and the
    quants L (n, N) in [0, 2*nmax - 1] (offset by nmax). Tries iscale = -(nmax + 0.1 is)/max for
    is = -9..9 and keeps the candidate that maximises (sum w x l)^2 / sum w l^2.
    """
    max_ = first_absmax(x)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, F32(1), max_)  # keeps the arithmetic finite; zero groups are reset below
    w = x * x if qw is None else qw
    wx = w * x
    lo, hi = F32(-nmax), F32(nmax - 1)
    l = np.empty_like(x)
    t = np.empty_like(x)

    def quants(iscale: np.ndarray) -> np.ndarray:
        # l = MAX(-nmax, MIN(nmax-1, nearest_int(iscale * x))), in place
        np.multiply(x, iscale, out=l)
        np.rint(l, out=l)
        return np.clip(l, lo, hi, out=l)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        quants(iscale)
        sumlx = seq_sum(np.multiply(wx, l, out=t))  # (w*x)*l
        np.multiply(w, l, out=t)
        return sumlx, seq_sum(np.multiply(t, l, out=t))  # (w*l)*l

    iscale = F32(-nmax) / max_
    sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    win = iscale  # the winner's quants are recomputed from its iscale at the end
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(is_)) / max_
        slx, sl2 = sums(iscale)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        if take.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                s = slx / sl2
            scale = np.where(take, s, scale)
            best = np.where(take, s * slx, best)
            win = np.where(take, iscale, win)
    L = quants(win)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero, F32(0), L + F32(nmax))
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search with coordinate descent (ggml ``make_q3_quants``, do_rmse = true), w = x^2.

    Starts from l = round(-nmax x / max), then up to 5 sweeps: for each element in turn, try the
    integer that is optimal given the others and keep it if it raises (sum w x l)^2 / sum w l^2.
    A group stops after a sweep that changed nothing. Returns the scale (N,) and L (n, N) + nmax.

    Vectorised by *moves*, not by elements: a group's sums change only when one of its elements
    moves, and moves are rare (most groups never move). Each round evaluates every element of
    every live group against the group's current sums at once -- exactly what C computes for the
    elements it visits while nothing moves -- and applies, per group, only the first move in C's
    visiting order from the group's next element on. That order wraps around into the next sweep:
    a sweep after a move starts with the same sums, and if none of the n elements moves in a row
    C's sweep ends without a change (or its 5 sweeps run out), so the group is finished. Rounds =
    the most moves of any group + 1; the first round, over all groups, tests only the candidates.
    """
    n, N = x.shape
    assert n & (n - 1) == 0, "the visiting order is computed modulo n, a power of two"
    max_ = first_absmax(x)
    zero = np.abs(max_) < GROUP_MAX_EPS
    max_ = np.where(zero, F32(1), max_)
    lo, hi = F32(-nmax), F32(nmax - 1)
    WW = np.empty((2, n, N), dtype=F32)  # [w*x, w] with w = x*x
    w, wx = np.multiply(x, x, out=WW[1]), np.multiply(WW[1], x, out=WW[0])
    L = np.multiply(x, F32(-nmax) / max_)
    np.rint(L, out=L)
    np.clip(L, lo, hi, out=L)
    TT = np.multiply(WW, L)  # the terms [(w*x)*l, (w*l)*l] of sumlx and suml2
    TT[1] *= L
    sums = np.stack([seq_sum(TT[0]), seq_sum(TT[1])])  # [sumlx, suml2]
    # All-zero groups take part harmlessly (w = 0, so slx > 0 never holds) and are reset below.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # round one, over all groups: moves are rare, so only the candidates are tested
        DD = np.subtract(sums[:, None, :], TT)  # [slx, sl2] = sums - terms, for every element
        slx, sl2 = DD[0], DD[1]
        nl = _q3_new_l(x, slx, sl2, lo, hi)
        cand = np.not_equal(nl, L)
        cand &= slx > 0
        idx = np.flatnonzero(cand)
        nl = nl.ravel()[idx]
        slx2 = slx.ravel()[idx] + wx.ravel()[idx] * nl
        sl22 = sl2.ravel()[idx] + w.ravel()[idx] * nl * nl
        g = idx % N
        a = sums[0, g]
        ok = (sl22 > 0) & (slx2 * slx2 * sums[1, g] > a * a * sl22)
        e = np.flatnonzero(ok)  # ordered by element, then group
        first = np.full(N, idx.size, dtype=idx.dtype)
        np.minimum.at(first, g[e], e)  # each group's first move
        cols = np.flatnonzero(first < idx.size)  # the groups that move
        e = first[cols]
        q = idx[e] // N
        nq = nl[e]
        # the moving groups go on in compact copies: X, W = [w*x, w], T = terms, AC = sums
        X = np.take(x, cols, axis=1)
        W = np.take(WW, cols, axis=2)
        T = np.take(TT, cols, axis=2)
        Lc = np.take(L, cols, axis=1)
        AC = np.stack([slx2[e], sl22[e]])
        pos = q + 1  # the element C visits next (n: the start of the next sweep) ...
        left = 5 * n - pos  # ... and how many visits it has left
        rows = np.arange(n)[:, None]
        while cols.size:
            # the move found last round (element q of each live group goes to nq): record it,
            # and replace that element's terms of the sums
            M = cols.size
            fi = q * M + np.arange(M)  # flat (element, live group)
            L[q, cols] = nq
            sums[:, cols] = AC
            Lc.ravel()[fi] = nq
            u = np.take(W.reshape(2, -1), fi, axis=1)
            u *= nq
            u[1] *= nq
            T.reshape(2, -1)[:, fi] = u
            D = np.subtract(AC[:, None, :], T)  # [slx, sl2] of every element
            slx, sl2 = D[0], D[1]
            nl = _q3_new_l(X, slx, sl2, lo, hi)
            ok = np.not_equal(nl, Lc)
            S = np.multiply(W, nl)
            S[1] *= nl
            S += D  # [slx + w*x*new_l, sl2 + w*new_l*new_l]
            lhs = np.multiply(S[0], S[0])
            lhs *= AC[1]
            rhs = np.multiply(AC[0] * AC[0], S[1])
            ok &= lhs > rhs
            ok &= np.minimum(slx, S[1]) > 0  # slx > 0 and sl2 > 0 (a NaN fails both ways)
            key = rows - pos  # C's visiting order from the next element on
            key &= n - 1
            key = np.where(ok, key, 127).min(axis=0)  # the first move, 127 for none
            q = pos + key
            q &= n - 1
            fi = q * M
            fi += np.arange(M)
            gi = np.flatnonzero(key < left)  # groups without a move are finished
            if gi.size < M:  # (their L and sums are already recorded)
                cols, pos, left, key, q, fi = cols[gi], pos[gi], left[gi], key[gi], q[gi], fi[gi]
                X, Lc = np.take(X, gi, axis=1), np.take(Lc, gi, axis=1)
                W, T = np.take(W, gi, axis=2), np.take(T, gi, axis=2)
            nq = nl.ravel()[fi]
            AC = np.take(S.reshape(2, -1), fi, axis=1)
            pos = q + 1
            left -= key + 1
    return _q3_scale(sums[0], sums[1], L, zero, nmax)


def _q3_new_l(x: np.ndarray, slx: np.ndarray, sl2: np.ndarray, lo: F32, hi: F32) -> np.ndarray:
    """MAX(-nmax, MIN(nmax-1, nearest_int(x * sl2 / slx))) as float32, for any quotient."""
    v = np.multiply(x, sl2)
    v /= slx
    nearest_int_(v)
    return np.clip(v, lo, hi, out=v)


def _q3_scale(sumlx: np.ndarray, suml2: np.ndarray, L: np.ndarray, zero: np.ndarray,
              nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants' result: scale = sumlx / suml2 (0 if suml2 <= 0) and L + nmax; 0 for
    all-zero groups."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero, F32(0), L + F32(nmax))
    return scale, L


def make_qkx_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                    nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale-and-min search (ggml ``make_qkx2_quants`` / ``make_qkx3_quants`` with weights).

    x, weights: (n, N). Starts from iscale = nmax / (max - min) with min = min(x, 0); then for
    is = 0..nstep tries iscale = (rmin + rdelta is + nmax) / (max - min), fits (d, m) by weighted
    least squares, and keeps it when its weighted error (|.| if use_mad else squared) is lower.
    ``min`` follows the winner, so each candidate depends on the previous ones.
    Returns scale d (N,), the_min = -min (N,) (so x ~ d l - the_min) and L (n, N) in [0, nmax].
    """
    w = weights
    mn = x.min(axis=0)
    mn = np.where(mn > 0, F32(0), mn)
    mx = x.max(axis=0)
    flat = mx <= mn
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    fmax = F32(nmax)
    l = np.empty_like(x)  # the candidate's quants
    t = np.empty_like(x)  # scratch
    u = np.empty_like(x)  # scratch

    def quantize(iscale: np.ndarray, mn: np.ndarray, out: np.ndarray) -> np.ndarray:
        # l = MAX(0, MIN(nmax, nearest_int(iscale * (x - min)))), in place
        np.subtract(x, mn, out=out)
        np.multiply(out, iscale, out=out)
        np.rint(out, out=out)
        return np.clip(out, F32(0), fmax, out=out)  # (np.clip is ~5x faster than minimum + maximum)

    def error(scale: np.ndarray, mn: np.ndarray, l: np.ndarray) -> np.ndarray:
        # sum_i w_i * f(scale * l_i + min - x_i), f = |.| or square, in C's order
        np.multiply(l, scale, out=t)
        np.add(t, mn, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(t, w, out=t)
        return seq_sum(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fmax / (mx - mn)
        scale = F32(1) / iscale
        best = error(scale, mn, quantize(iscale, mn, l))
        # the winner's quants are recomputed at the end from its iscale and min
        win_iscale, win_mn = iscale, mn
        for is_ in range(nstep + 1 if nstep >= 1 else 0):
            iscale = (F32(rmin) + F32(rdelta) * F32(is_) + fmax) / (mx - mn)
            quantize(iscale, mn, l)
            np.multiply(w, l, out=u)  # w*l
            sum_l = seq_sum(u)
            sum_l2 = seq_sum(np.multiply(u, l, out=t))  # (w*l)*l
            sum_xl = seq_sum(np.multiply(u, x, out=t))  # (w*l)*x
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, l)
            take = (D > 0) & (cur < best)
            if take.any():
                best = np.where(take, cur, best)
                scale = np.where(take, this_scale, scale)
                win_iscale = np.where(take, iscale, win_iscale)
                win_mn = np.where(take, mn, win_mn)
                mn = np.where(take, this_min, mn)
        L = quantize(win_iscale, win_mn, l)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat, F32(0), L)
    return scale, -mn, L


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search for the super-block scale of non-negative sub-block scales (ggml ``make_qp_quants``).

    x: (n, N) scales or mins, qw: (n, N) their weights. Picks iscale among (nmax + 0.1 is)/max,
    is = -4..4, by weighted squared error, then refines the integers by coordinate descent (as
    make_q3_quants). Returns d (N,) and L (n, N) as uint8 values (C stores them in uint8_t).
    """
    n, N = x.shape
    max_ = np.maximum(x.max(axis=0), F32(0))
    zero = max_ < GROUP_MAX_EPS
    max_ = np.where(zero, F32(1), max_)
    fmax = F32(nmax)
    w = qw
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fmax / max_
        scale = F32(1) / iscale
        L0 = (nearest_int(iscale * x) & 0xFF).astype(F32)
        diff = x - scale * L0
        best = seq_sum(w * diff * diff)
        for is_ in range(-4, 5):
            if is_ == 0:
                continue
            iscale_is = (F32(0.1) * F32(is_) + fmax) / max_
            scale_is = F32(1) / iscale_is
            l = np.minimum(nearest_int(iscale_is * x), nmax).astype(F32)
            diff = x - scale_is * l
            mse = seq_sum(w * diff * diff)
            take = mse < best
            best = np.where(take, mse, best)
            iscale = np.where(take, iscale_is, iscale)
        l = np.minimum(nearest_int(iscale * x), nmax).astype(F32)  # int l: the sums use it signed
        L = (l.astype(np.int32) & 0xFF).astype(F32)  # ... and uint8_t L[] keeps its low byte
        wx = w * x
        sumlx = seq_sum(wx * l)
        suml2 = seq_sum(w * l * l)
        active = ~zero
        for _ in range(5):
            changed = np.zeros(N, dtype=bool)
            for i in range(n):
                wi, wxi, Li, xi = w[i], wx[i], L[i], x[i]
                slx = sumlx - wxi * Li
                sl2 = suml2 - wi * Li * Li
                new_i = np.minimum(nearest_int((xi * sl2) / slx), nmax)
                new_l = new_i.astype(F32)
                slx2 = slx + wxi * new_l
                sl22 = sl2 + wi * new_l * new_l
                take = (active & (slx > 0) & (sl2 > 0) & (new_l != Li)
                        & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[i] = np.where(take, (new_i & 0xFF).astype(F32), Li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
            active &= changed
            if not active.any():
                break
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    d = np.where(zero, F32(0), d)
    L = np.where(zero, F32(0), L)
    return d, L.astype(np.uint8)
