"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), one linear layer at a time, in the paper's order and names.

For a layer with weight ``W`` (rows = outputs, columns = inputs) and calibration inputs ``X``
(columns = tokens), GPTQ looks for quantized ``Q`` minimising ``||W X - Q X||²``. Rows are
independent; each has the same Hessian

    H = 2 X Xᵀ / N          (accumulated in fp32 over the N calibration tokens: :meth:`GPTQ.add_batch`)

Optimal Brain Quantization quantizes one weight ``w_q`` at a time and moves the not yet quantized
ones ``F`` to compensate:  ``δ_F = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}``, then removes
``q`` from ``H_F⁻¹``. GPTQ makes three changes (:meth:`GPTQ.quantize`):

1. the same, fixed column order for every row (optionally by decreasing ``diag(H)``: *act-order*,
   or *group-aware reordering*, below), so ``H_F⁻¹`` is shared by all rows;
2. *lazy batch updates*: the update is applied inside a block of ``B = 128`` columns at once
   (``W1``, ``Err1``), and to the columns after the block with one matrix product
   ``W[:, i2:] -= Err1 · Hinv[i1:i2, i2:]``;
3. *Cholesky form*: the rows of successive ``H_F⁻¹`` restricted to ``F`` are the rows of the
   upper Cholesky factor of ``H⁻¹`` (scaled), so ``Hinv = chol(H⁻¹)ᵀ`` computed once replaces the
   removal step, with *dampening* ``H += λ I``, ``λ = damp · mean(diag H)`` for stability
   (raised automatically, x10, while the factorisation fails).

Dead inputs (``diag(H) = 0``, never active in calibration) get ``H_ii = 1`` and ``W_:,i = 0``.

*Group-aware reordering* (``act_group_aware``, GAR: Gafni, Karnieli, Hanani 2025, "Dual Precision
Quantization for Efficient and Accurate Deep Neural Networks Inference") is act-order that keeps
every group's columns together: inside each full group of ``g`` columns, columns by decreasing
``diag(H)``; the groups themselves by decreasing largest ``diag(H)``; a shorter last group (a width
that ``g`` does not divide) stays last, in natural order. Each group is still one contiguous run of
its own columns, so ``g_idx[i] = i // g`` and the checkpoint is the plain, un-permuted one (no
``desc_act`` for the loaders), while the most salient groups are quantized first and the error
is pushed into the less salient ones. It is GPTQModel 7.6's default whenever ``desc_act`` is off: with the same Hessian and the same settings otherwise, its layer output error
is about 25% below plain GPTQ's on the default model's first block (SmolLM2-135M), which is what an
8% perplexity gap between the two quantizers came from before we had it.

The quantization grid (:func:`find_params`, :func:`quantize`) is the reference's, per row over
a group of ``g`` columns, with ``maxq = 2^bits - 1``:

    asymmetric:  scale = (max - min) / maxq,  zero = round(-min / scale)
    symmetric:   scale = 2 max|x| / maxq,      zero = (maxq + 1) / 2
    q = clamp(round(x / scale) + zero, 0, maxq),   x' = scale (q - zero)

(min is taken over the group and 0, max likewise.) Optional MSE clipping (``mse``) shrinks the
range by ``p = 1, 0.99, ... 0.21`` and keeps, per row, the one with the smallest
``sum |x - x'|^2.4`` (the reference's grid of 100 and norm 2.4). Groups are formed in the
quantization order from the weights *as updated so far* (``W[:, i:i+g]`` at the group's first
column, including the updates of the current lazy block), or, with *static groups*, once from
the original weights in natural order.

Differences from the reference code: a group that starts inside a lazy block takes its grid from
the updated weights (the reference reads the columns before this block's updates; the two agree
when the group size is a multiple of the block size, e.g. 128); the asymmetric zero is at least 1, because the standard
"gptq" v1 checkpoint stores ``zero - 1`` in ``bits`` bits and cannot hold -1 (a group whose
values are all positive then uses the grid shifted by one step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4  # the reference's clipping search


# --------------------------------------------------------------------------------------------
# The quantization grid
# --------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``x' = scale (clamp(round(x / scale) + zero, 0, maxq) - zero)``: ``x`` on its grid (same shape)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` of ``x`` (as int32)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq).to(torch.int32)


def find_params(x: torch.Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the grid for ``x`` (rows, cols): each (rows, 1), fp32."""
    maxq = 2**bits - 1
    x = x.float()
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zeros)
    xmax = torch.maximum(x.max(1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)

    def grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (hi - lo) / maxq
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale).clamp(min=1)  # v1 checkpoints store zero - 1 >= 0
        return scale, zero

    scale, zero = grid(xmin, xmax)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
            p = 1 - i / MSE_GRID
            scale1, zero1 = grid(p * xmin, p * xmax)
            err = (quantize(x, scale1[:, None], zero1[:, None], maxq) - x).abs_().pow_(MSE_NORM).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale[:, None], zero[:, None]


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------


@dataclass
class QuantizedLayer:
    """What GPTQ (or RTN) produces for a layer of ``rows`` outputs and ``columns`` inputs.

    ``codes`` (rows, columns) int32 in [0, maxq] in the natural column order; ``scales`` and
    ``zeros`` (rows, G) fp32 indexed by group; ``g_idx`` (columns,) int32 the group of each input
    column. De-quantized weight: ``scales[:, g_idx] * (codes - zeros[:, g_idx])``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    damp: float = 0.0  # the dampening that was used (after any automatic raise)
    loss: float = 0.0  # GPTQ's own estimate sum (w - q)² / [Hinv]_qq² / 2

    def dequantize(self) -> torch.Tensor:
        """The (rows, columns) fp32 weight ``scale (q - zero)`` of each column's group."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g])


def rtn(W: torch.Tensor, bits: int, group_size: int | None, sym: bool, mse: bool = False) -> QuantizedLayer:
    """Round-to-nearest baseline on the same grid: each group of ``group_size`` columns (or the whole
    row) gets its own (scale, zero) and every weight is rounded independently."""
    W = W.float()
    rows, columns = W.shape
    g = group_size or columns
    maxq = 2**bits - 1
    scales, zeros = zip(*(find_params(W[:, i:i + g], bits, sym, mse) for i in range(0, columns, g)), strict=True)
    scales_t, zeros_t = torch.cat(scales, 1), torch.cat(zeros, 1)  # (rows, G)
    g_idx = torch.arange(columns, dtype=torch.int32) // g
    Q = codes(W, scales_t[:, g_idx.long()], zeros_t[:, g_idx.long()], maxq)
    return QuantizedLayer(Q, scales_t, zeros_t, g_idx, bits)


def group_aware_order(diag: torch.Tensor, g: int) -> torch.Tensor:
    """GAR's column order: full groups of ``g`` by decreasing largest ``diag``, each group's columns by
    decreasing ``diag``; a shorter last group stays last, in natural order. A permutation (columns,)."""
    columns = diag.numel()
    full = columns // g
    within = torch.argsort(diag[:full * g].view(full, g), dim=1, descending=True, stable=True)
    top = diag[:full * g].view(full, g).max(1).values
    groups = torch.argsort(top, descending=True, stable=True)
    perm = (within + torch.arange(full)[:, None] * g)[groups].flatten()
    return torch.cat([perm, torch.arange(full * g, columns)])


class GPTQ:
    """The Hessian of one linear layer's inputs, and the GPTQ quantization of its weight.

    ``add_batch(X)`` with inputs (tokens, columns) accumulates ``H = 2 X Xᵀ / N`` in fp32 (a
    running mean, so batches of any size can be added); ``quantize(W, ...)`` runs the algorithm.
    """

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add the inputs ``inp`` (tokens, columns) of one forward: ``H <- (n H + 2 XᵀX) / (n + t)``."""
        X = inp.reshape(-1, self.columns).float()  # (t, columns)
        t = X.shape[0]
        self.H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        X = math.sqrt(2 / self.nsamples) * X
        self.H += X.t() @ X

    def output_error(self, dW: torch.Tensor) -> float:
        """``||ΔW X||² / N``, the mean squared output error per token, from ``H = 2 X Xᵀ / N``:
        ``sum_rows ΔW H ΔWᵀ / 2``."""
        dW = dW.float()
        return float(((dW @ self.H) * dW).sum() / 2)

    def quantize(self, W: torch.Tensor, bits: int = 4, group_size: int | None = None, sym: bool = True,
                 desc_act: bool = False, static_groups: bool = False, damp: float = 0.01,
                 blocksize: int = 128, mse: bool = False, act_group_aware: bool = False) -> QuantizedLayer:
        """GPTQ on ``W`` (rows, columns) with this layer's Hessian (the reference's ``fasterquant``).

        The column loop runs on one thread: it is thousands of small operations, which a second
        thread only slows down (measured 0.56 s vs 8.9 s for a 1536 x 576 layer with the other core
        busy); the Cholesky factorisations before it use the caller's threads."""
        with torch.no_grad():
            return self._quantize(W, bits, group_size, sym, desc_act, static_groups, damp, blocksize, mse,
                                  act_group_aware)

    def _quantize(self, W: torch.Tensor, bits: int, group_size: int | None, sym: bool, desc_act: bool,
                  static_groups: bool, damp: float, blocksize: int, mse: bool,
                  act_group_aware: bool) -> QuantizedLayer:
        W = W.detach().clone().float()
        rows, columns = W.shape
        assert columns == self.columns and self.nsamples > 0
        g = group_size or columns
        H = self.H.clone()

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        if static_groups:  # every group's grid from the original weights, in natural order
            static = [find_params(W[:, i:i + g], bits, sym, mse) for i in range(0, columns, g)]

        if desc_act:
            perm = torch.argsort(torch.diag(H), descending=True)
        elif act_group_aware and group_size:
            perm = group_aware_order(torch.diag(H), g)
        else:
            perm = torch.arange(columns)
        if not torch.equal(perm, torch.arange(columns)):  # (no copies of W and H for the natural order)
            W = W[:, perm]
            H = H[perm][:, perm]

        Hinv, damp = self._inverse_cholesky(H, damp)
        del H  # a Hessian is columns² floats (127 MB for a 5632-wide layer): hold one, not several
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._columns(W, Hinv, perm, bits, g, sym, static_groups, blocksize, mse,
                                 act_group_aware and not desc_act and group_size is not None, damp,
                                 static if static_groups else None)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _columns(W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor, bits: int, g: int, sym: bool,
                 static_groups: bool, blocksize: int, mse: bool, gar: bool, damp: float,
                 static: list[tuple[torch.Tensor, torch.Tensor]] | None) -> QuantizedLayer:
        """The column loop: quantize ``W`` (already in the order ``perm``) column by column, in lazy
        blocks, with the upper Cholesky factor ``Hinv`` of its inverse Hessian."""
        rows, columns = W.shape
        maxq = 2**bits - 1

        Q = torch.zeros_like(W)  # codes, in the permuted order (as floats until the end)
        loss = 0.0  # sum of Losses
        group_of: list[int] = []  # group of each permuted column
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        scale = zero = torch.empty(0)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            count = i2 - i1
            # the lazy block is held transposed (a column of W is a contiguous row of W1t), so that
            # each column's update of the block's later columns runs over contiguous memory
            W1t = W[:, i1:i2].t().contiguous()  # (count, rows)
            Q1t = torch.zeros_like(W1t)
            Err1t = torch.zeros_like(W1t)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = Hinv1.diagonal().tolist()  # [Hinv]_qq as Python floats: no 0-d tensor per column
            for i in range(count):
                col = i1 + i
                w = W1t[i]
                if static_groups:
                    group_of.append(int(perm[col]) // g)
                    assert static is not None
                    scale, zero = (t.view(-1) for t in static[group_of[-1]])
                elif col % g == 0:
                    # A new group's grid, from its weights as updated so far; the columns after this
                    # block have not received this block's updates yet (lazy), so add them here.
                    ahead = W[:, i2:col + g] - Err1t[:i].t() @ Hinv[i1:i1 + i, i2:col + g]
                    scale, zero = find_params(torch.cat([W1t[i:].t(), ahead], 1)[:, :g], bits, sym, mse)
                    scales.append(scale)
                    zeros.append(zero)
                    scale, zero = scale.view(-1), zero.view(-1)
                if not static_groups:
                    group_of.append(len(scales) - 1)
                # q = quant(w); err = (w - q) / [Hinv]_qq; the block's later columns move by -err Hinv_q,
                # in as few operations as possible (this loop runs once per input column)
                q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
                Q1t[i] = q
                err1 = (w - scale * (q - zero)) / d1[i]
                W1t[i:].addr_(Hinv1[i, i:], err1, alpha=-1)
                Err1t[i] = err1
            Q[:, i1:i2] = Q1t.t()
            loss += float(Err1t.pow(2).sum()) / 2  # Losses1 = (w - q)² / [Hinv]_qq² = Err1²
            W[:, i2:] -= Err1t.t() @ Hinv[i1:i2, i2:]

        group_t = torch.tensor(group_of, dtype=torch.long)
        invperm = torch.argsort(perm)
        if static_groups:
            scales_t = torch.cat([s for s, _ in static], 1)
            zeros_t = torch.cat([z for _, z in static], 1)
        else:
            scales_t, zeros_t = torch.cat(scales, 1), torch.cat(zeros, 1)
            if gar:
                # the k-th group quantized is the natural group of its first column: store the grids,
                # and g_idx, in natural group order (the checkpoint stays un-permuted)
                natural = perm[torch.arange(0, columns, g)] // g
                order = torch.argsort(natural)
                scales_t, zeros_t = scales_t[:, order], zeros_t[:, order]
                group_t = natural[group_t]
        return QuantizedLayer(Q[:, invperm].to(torch.int32), scales_t, zeros_t,
                              group_t[invperm].to(torch.int32), bits, damp, loss)

    @staticmethod
    def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
        """``Hinv = chol((H + λI)⁻¹)ᵀ`` (upper), with ``λ = damp · mean(diag H)``; ``damp`` is raised
        x10 (up to 1.0, then the diagonal mean itself x10) while the factorisation fails."""
        columns = H.shape[0]
        mean_diag = torch.mean(torch.diag(H))
        while True:
            Hd = H.clone()
            Hd.diagonal().add_(damp * mean_diag)
            L, info = torch.linalg.cholesky_ex(Hd)
            del Hd  # each step frees the last: three columns² matrices at most, with H
            if info == 0:
                Hinv_full = torch.cholesky_inverse(L)
                del L
                U, info = torch.linalg.cholesky_ex(Hinv_full, upper=True)
                del Hinv_full
                if info == 0 and torch.isfinite(U).all():
                    return U, damp
            new = damp * 10
            log.warning("Cholesky failed with damp=%g on a %d-column Hessian; retrying with %g", damp, columns, new)
            if new > 1e6:
                raise RuntimeError("GPTQ: the Hessian stays singular after dampening (non-finite inputs?)")
            damp = new
