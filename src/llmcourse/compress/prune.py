"""Unstructured and N:M pruning of a causal LM's linear layers: magnitude, Wanda and SparseGPT.

A layer ``y = W x`` with ``W`` (rows = outputs, columns = inputs) is pruned by a *mask* ``M`` (True =
the weight becomes 0). Three criteria, from the cheapest to the most accurate:

* **magnitude**: prune the smallest ``|W_ij|``. No data.
* **Wanda** (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): the score of a weight is its magnitude times the norm of the input feature it multiplies,

      S_ij = |W_ij| · ||X_j||_2          (X_j: feature j over every calibration token)

  compared *within each output row* (each row loses the same fraction), no weight update. ``||X_j||²`` is
  accumulated per feature by :class:`FeatureNorms` (locuslab/wanda's ``scaler_row``, up to a constant
  factor that does not change any ranking).
* **SparseGPT** (Frantar, Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"): Optimal Brain Surgeon with GPTQ's machinery. With ``H = 2 X Xᵀ / N`` (the GPTQ lab's
  :class:`~llmcourse.quant.gptq.GPTQ` Hessian) and ``Hinv = chol((H + λI)⁻¹)ᵀ`` (upper Cholesky factor,
  ``λ = damp · mean diag H``), columns are visited left to right in lazy blocks of ``B`` columns; in each
  block the mask is chosen *adaptively* from the weights as updated so far by the OBS saliency

      ε_ij = W_ij² / [Hinv]_jj²

  (the ``p`` fraction with the lowest ε over the block: IST-DASLab/sparsegpt's ``fasterprune``; or, with
  ``scope="row"``, the same fraction in each row of the block, so every row keeps exactly its share), and
  for N:M every group of M columns picks its N lowest ε when the group starts. Then, for each column ``j``,

      q_j = W_:j with the masked entries set to 0 (optionally rounded to a 4-bit grid: joint quantization)
      err = (W_:j - q_j) / [Hinv]_jj ;   W_:,j: -= err · Hinv_j,j:          (inside the block)

  and the columns after the block get ``W_:,i2: -= Err · Hinv_i1:i2,i2:`` in one product (lazy batch).

N:M (e.g. 2:4, what NVIDIA's sparse tensor cores run): in every row, each group of M consecutive input
columns keeps M - N weights. Unstructured: each row (magnitude, Wanda, SparseGPT ``scope="row"``) or each
block (SparseGPT ``scope="block"``, the reference) loses ``int(sparsity · width)`` weights.

:func:`prune_model` runs block by block like GPTQ: the calibration windows go through the embeddings
once, each decoder block's layer statistics are collected from inputs that passed through the blocks
already pruned, the block is pruned, and its outputs become the next block's inputs. Only one block's
activations live at a time (``load_block`` / ``done_block`` let a caller stream the weights too).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from llmcourse.core.errors import UserError
from llmcourse.core.modules import (
    block_inputs,
    decoder_blocks,
    float_decoder_blocks,
    linear_layers,
    linear_weight,
    run_block,
)
from llmcourse.core.progress import progress

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("row", "block")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): N pruned out of every M consecutive weights; one-line error otherwise."""
    try:
        n_s, m_s = text.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise UserError(f"--nm {text!r} is not N:M", "pass e.g. --nm 2:4 (2 of every 4 weights pruned)") from None
    if not 0 < n < m:
        raise UserError(f"--nm {text}: N must be in [1, M) (N >= M would prune every weight)", "pass e.g. --nm 2:4")
    return n, m


@dataclass
class PruneConfig:
    """What to prune and how; validated here, at the boundary."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    sparsity: float = 0.5  # unstructured: the fraction of each row (or block) set to zero
    nm: tuple[int, int] | None = None  # N:M instead of unstructured
    block_size: int = 128  # SparseGPT's lazy block (and mask-selection block)
    damp: float = 0.01  # SparseGPT's dampening, a fraction of mean(diag H)
    scope: str = "row"  # SparseGPT unstructured: mask chosen per row of a block, or over the block (reference)
    bits: int = 0  # SparseGPT joint quantization to this many bits (0: none), per-row asymmetric grid
    true_sequential: bool = False  # statistics of each stage after the stages before it are pruned

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}", f"use one of {', '.join(METHODS)}")
        if self.nm is None and not (math.isfinite(self.sparsity) and 0 < self.sparsity < 1):
            raise UserError(f"--sparsity must be in (0, 1) (got {self.sparsity})", "pass e.g. --sparsity 0.5")
        if self.nm is not None and not 0 < self.nm[0] < self.nm[1]:
            raise UserError(f"--nm {self.nm[0]}:{self.nm[1]}: N must be in [1, M)", "pass e.g. --nm 2:4")
        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1 (got {self.block_size})", "use e.g. 128")
        if not (math.isfinite(self.damp) and 0 < self.damp <= 1):
            raise UserError(f"--damp must be in (0, 1] (got {self.damp})", "use e.g. 0.01")
        if self.scope not in SCOPES:
            raise UserError(f"unknown --scope {self.scope!r}", f"use one of {', '.join(SCOPES)}")
        if self.bits not in (0, 2, 3, 4, 8):
            raise UserError(f"--bits {self.bits} is not supported", "use 0 (no quantization), 2, 3, 4 or 8")
        if self.bits and self.method != "sparsegpt":
            raise UserError("--bits (joint quantization) needs --method sparsegpt", "drop --bits or use sparsegpt")

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.0%}"

    @property
    def name(self) -> str:
        q = f" + {self.bits}-bit" if self.bits else ""
        return f"{self.method} {self.pattern}{q}"

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"


# --------------------------------------------------------------------------------------------
# Masks (True = pruned), one layer
# --------------------------------------------------------------------------------------------


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(sparsity · columns)`` lowest scores of each row (stable sort, as Wanda)."""
    k = int(score.shape[1] * sparsity)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores of every group of ``m`` consecutive columns in each row."""
    rows, columns = score.shape
    assert columns % m == 0, "check_model refuses widths that M does not divide"
    groups = score.reshape(rows, columns // m, m)  # (rows, G, m)
    idx = torch.topk(groups, n, dim=-1, largest=False)[1]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, columns)


def magnitude_mask(W: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """The magnitude criterion ``|W|``, per row (or per N:M group)."""
    score = W.abs().float()
    return nm_mask(score, *cfg.nm) if cfg.nm else row_mask(score, cfg.sparsity)


def wanda_score(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``|W_ij| · ||X_j||_2`` from the squared feature norms ``sq_norms`` (columns,)."""
    return W.abs().float() * torch.sqrt(sq_norms.float()).reshape(1, -1)


def wanda_mask(W: torch.Tensor, sq_norms: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """Wanda's mask: the lowest scores within each output row (or each N:M group of a row)."""
    score = wanda_score(W, sq_norms)
    return nm_mask(score, *cfg.nm) if cfg.nm else row_mask(score, cfg.sparsity)


class FeatureNorms:
    """``||X_j||²`` per input feature, accumulated over batches of inputs (tokens, columns).

    Kept as a running mean (``sq_norms = sum x² / N``), the scale of locuslab/wanda's ``scaler_row``
    up to a constant; ``add_batch`` has the GPTQ Hessian's signature, so the same collection pass fills both."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.sq_norms = torch.zeros(columns, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        X = inp.reshape(-1, self.columns).float()
        t = X.shape[0]
        self.sq_norms *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        self.sq_norms += X.pow(2).sum(0) / self.nsamples


# --------------------------------------------------------------------------------------------
# SparseGPT, one layer
# --------------------------------------------------------------------------------------------


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``chol((H + λI)⁻¹)ᵀ`` (upper), ``λ = damp · mean(diag H)``; ``damp`` is raised x10 while it fails."""
    mean_diag = torch.mean(torch.diag(H))
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        if damp * 10 > 1e6:
            raise RuntimeError("SparseGPT: the Hessian stays singular after dampening (non-finite inputs?)")
        log.warning("Cholesky failed with damp=%g; retrying with %g", damp, damp * 10)
        damp *= 10


@dataclass
class SparseLayer:
    """What SparseGPT produces for one layer: the updated (pruned, maybe quantized) weight and its mask."""

    weight: torch.Tensor  # (rows, columns) fp32, zero where ``mask``
    mask: torch.Tensor  # (rows, columns) bool, True = pruned
    loss: float  # OBS's estimate sum (w - q)² / [Hinv]_jj² / 2
    damp: float


@torch.no_grad()
def sparsegpt(W: torch.Tensor, H: torch.Tensor, cfg: PruneConfig,
              grid: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> SparseLayer:
    """SparseGPT on ``W`` (rows, columns) with the Hessian ``H`` (columns, columns): ``fasterprune``.

    ``grid`` = (scale, zero, maxq), each (rows, 1), rounds the kept weights to a quantization grid as
    they are visited (joint sparsification and quantization, the paper's section 3.5)."""
    W = W.detach().clone().float()
    rows, columns = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = inverse_cholesky(H, cfg.damp)
    del H
    n, m = cfg.nm if cfg.nm else (0, 0)
    B = cfg.block_size
    mask = torch.zeros_like(W, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if n:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            eps = W1 ** 2 / d.reshape(1, -1) ** 2  # OBS saliency of each weight of the block
            if cfg.scope == "block":  # the reference: one threshold over the whole block
                thresh = torch.sort(eps.flatten())[0][int(eps.numel() * cfg.sparsity)]
                mask1 = eps <= thresh
            else:  # each row loses its share of the block, so every row ends at int(sparsity · columns)
                k = int(i2 * cfg.sparsity) - int(i1 * cfg.sparsity)
                idx = torch.sort(eps, dim=-1, stable=True)[1][:, :k]
                mask1 = torch.zeros_like(W1, dtype=torch.bool).scatter_(1, idx, True)
        for i in range(count):
            w = W1[:, i]
            if n and i % m == 0:  # an N:M group starts: its mask from the weights as updated so far
                eps = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(eps, n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if grid is not None:
                scale, zero, maxq = grid
                q = (scale * (torch.clamp(torch.round(q.unsqueeze(1) / scale) + zero, 0, maxq) - zero)).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d[i]
            loss += float((err1 ** 2).sum()) / 2
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return SparseLayer(W, mask, loss, damp)


# --------------------------------------------------------------------------------------------
# A whole model, block by block
# --------------------------------------------------------------------------------------------


def check_model(model: nn.Module, cfg: PruneConfig) -> None:
    """A one-line UserError unless every decoder-block linear layer can be pruned with ``cfg``."""
    prefix, blocks = float_decoder_blocks(model, "pruning")
    if cfg.nm:
        for name, mod in linear_layers(blocks):
            columns = linear_weight(mod).shape[1]
            if columns % cfg.nm[1]:
                raise UserError(f"{prefix}.{name} has {columns} inputs, not a multiple of M={cfg.nm[1]}",
                                "choose an M that divides every layer's input width (e.g. 4)")


def _set_weight(m: nn.Module, W: torch.Tensor) -> None:
    """Give an ``nn.Linear`` or a ``Conv1D`` (stored transposed) the (out, in) weight ``W``, in new storage."""
    m.weight.data = (W if isinstance(m, nn.Linear) else W.t()).to(m.weight.dtype).contiguous()


def _grid(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The per-row asymmetric grid of the whole row (the reference's ``find_params(W, weight=True)``)."""
    from llmcourse.quant.gptq import find_params

    scale, zero = find_params(W, bits, sym=False)
    return scale, zero, 2**bits - 1


def prune_layer(m: nn.Module, cfg: PruneConfig, stats: Any | None) -> dict[str, Any]:
    """Prune one linear layer in place with ``stats`` (a GPTQ Hessian or :class:`FeatureNorms`); its log row."""
    W = linear_weight(m).float()
    t0 = time.perf_counter()
    row: dict[str, Any] = {}
    if cfg.method == "magnitude":
        mask = magnitude_mask(W, cfg)
        new = W.masked_fill(mask, 0)
    elif cfg.method == "wanda":
        mask = wanda_mask(W, stats.sq_norms, cfg)
        new = W.masked_fill(mask, 0)
    else:
        grid = _grid(W, cfg.bits) if cfg.bits else None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of small operations: a second thread only slows them down
        try:
            res = sparsegpt(W, stats.H, cfg, grid)
        finally:
            torch.set_num_threads(threads)
        mask, new = res.mask, res.weight
        row.update(obs_loss=res.loss, damp=res.damp)
    if stats is not None and hasattr(stats, "output_error"):
        row["output_error"] = stats.output_error(new - W)
    row.update(rows=W.shape[0], columns=W.shape[1], sparsity=float(mask.float().mean()),
               zeros=float((new == 0).float().mean()),
               min_row_sparsity=float(mask.float().mean(1).min()), max_row_sparsity=float(mask.float().mean(1).max()),
               seconds=time.perf_counter() - t0)
    _set_weight(m, new)
    return row


def _stats_for(cfg: PruneConfig, columns: int) -> Any:
    if cfg.method == "sparsegpt":
        from llmcourse.quant.gptq import GPTQ

        return GPTQ(columns)
    return FeatureNorms(columns)


@torch.no_grad()
def prune_model(model: nn.Module, windows: torch.Tensor | None, cfg: PruneConfig,
                load_block: Callable[[int, nn.Module], None] | None = None,
                done_block: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Prune the linear layers of ``model``'s decoder blocks in place; returns the report (per layer and
    per block sparsity, output errors, seconds). ``windows`` (n, seq_len): calibration (not for magnitude)."""
    from llmcourse.quant.gptq import collect_hessians, sequential_stages

    check_model(model, cfg)
    if cfg.calibrated and windows is None:
        raise UserError(f"{cfg.method} needs calibration windows", "pass --samples and --seq-len")
    prefix, blocks = decoder_blocks(model)
    t0 = time.perf_counter()
    inputs = block_inputs(model, windows) if cfg.calibrated else None
    rows: list[dict[str, Any]] = []
    per_block: list[dict[str, Any]] = []
    bar = progress(total=len(blocks), desc=f"prune {cfg.name}", unit="block")
    for b, block in enumerate(blocks):
        if load_block is not None:
            load_block(b, block)
        layers = dict(linear_layers(block))
        if inputs is None:
            for n, mod in layers.items():
                rows.append({"layer": f"{prefix}.{b}.{n}", **prune_layer(mod, cfg, None)})
        else:
            groups = sequential_stages(block, layers, inputs[0])
            passes = [[g] for g in groups] if cfg.true_sequential else [groups]
            for pass_groups in passes:
                stats = {g[0]: _stats_for(cfg, linear_weight(layers[g[0]]).shape[1]) for g in pass_groups}
                collect_hessians(block, pass_groups, layers, stats, inputs)
                for group in pass_groups:
                    s = stats.pop(group[0])
                    for n in group:
                        rows.append({"layer": f"{prefix}.{b}.{n}", **prune_layer(layers[n], cfg, s)})
                    del s
            for inp in inputs:  # the next block sees this block's pruned outputs
                inp.hidden = run_block(block, inp)
        mine = [r for r in rows if r["layer"].startswith(f"{prefix}.{b}.")]
        total = sum(r["rows"] * r["columns"] for r in mine)
        per_block.append({"block": b, "sparsity": sum(r["sparsity"] * r["rows"] * r["columns"] for r in mine) / total})
        if done_block is not None:
            done_block(b, block)
        bar.update(1)
        bar.set_postfix(sparsity=f"{per_block[-1]['sparsity']:.3f}")
    bar.close()
    total = sum(r["rows"] * r["columns"] for r in rows)
    pruned = sum(r["sparsity"] * r["rows"] * r["columns"] for r in rows)
    return {"config": {**asdict(cfg), "nm": list(cfg.nm) if cfg.nm else None}, "layers": rows, "blocks": per_block,
            "sparsity": pruned / max(1, total), "pruned_weights": int(round(pruned)), "block_weights": total,
            "seconds": time.perf_counter() - t0,
            "calibration": None if windows is None else list(windows.shape)}


def model_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each decoder-block linear weight (the saved folder's own view)."""
    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{n}": float((linear_weight(m) == 0).float().mean()) for n, m in linear_layers(blocks)}
