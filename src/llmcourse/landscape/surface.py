"""Exact loss surfaces: ``L(a, b) = L(θ0 + a·d1 + b·d2)`` on a line or a grid (Li et al. 2018).

Each point evaluates the model at ``w = (w0 + b·d2) + a·d1`` computed from the stored weights ``w0``,
which are never written: :class:`Perturbation` hooks every module that owns a moving parameter, and just
before that module runs points the parameter at a scratch tensor ``t = r_b + a·d1``
(``torch.add(r_b, d1, alpha=a, out=t)``, with the row's ``r_b = w0 + b·d2`` kept while ``b`` stays), then
points it back at ``w0`` right after. One scratch tensor per shape serves all blocks, so it stays in cache:
a point costs two reads per weight and no write to memory, where setting the weights in place costs two
reads and a write, and the notebook's add-then-subtract costs several passes, allocates a step per tensor
and ends 2.4e-6 away from where it started. Nothing drifts (every point is computed from ``w0``, whatever
the order), the centre ``a = b = 0`` runs on ``w0`` itself and equals the unperturbed loss exactly, and
the weights are bit-identical after a sweep, also after an error or Ctrl-C (they were never written; the
parameters are pointed back at them on exit). No model is copied per point. Parameters whose directions
are all zero (``ignore='biasbn'``) are never touched.

The loss is the mean next-token cross-entropy over eval windows, one batched forward of all windows
(B, T) per point::

    L = −1/(B(T−1)) Σ_b Σ_{t<T} log p(x_{b,t+1} | x_{b,≤t})

A sweep can save its partial results (NaN where not done) to a state file as it goes; a rerun with
the same settings key skips the points already done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_file
from llmcourse.core.progress import progress
from llmcourse.landscape.directions import Direction, perturbed_parameters

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module], float]


@torch.inference_mode()
def batched_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` over the windows ``ids`` (B, T), one forward."""
    ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(1, -1)
    if ids.shape[1] < 2:
        raise UserError("the text has fewer than 2 tokens", "pass a longer text")
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))


def loss_on(ids: torch.Tensor) -> LossFn:
    """The loss function of a sweep: :func:`batched_loss` on fixed windows."""
    return lambda model: batched_loss(model, ids)


class Perturbation:
    """Weights ``w = w0 + Σ_k c_k·d_k`` seen by the forward, set per module just before it runs; the
    stored weights ``w0`` are never written.

    Use as ``with Perturbation(model, [d1, d2]) as p: p.set((a, b)); loss(model)``. :meth:`set` only
    records the coefficients (and, when ``c_1..`` change, the row ``r = w0 + Σ_{k≥1} c_k d_k``); a forward
    pre-hook on each module that owns a moving parameter points the parameter at a scratch tensor
    ``t = r + c_0·d_0`` (``torch.add(r, d0, alpha=c0, out=t)``) and the post-hook points it back at ``w0``.
    One scratch tensor per shape serves every block, so it stays in cache and a point costs two reads of
    ``r`` and ``d0`` (the forward then reads ``t`` from cache); an embedding only fills the rows of its
    input ids. ``keep_rows=False`` keeps no row (no full-size copy): each scratch tensor then sums
    ``w0 + Σ_k c_k d_k`` itself, one more read per point instead of two reads and a write per row. A parameter whose module's forward never ran (used outside its module) is set eagerly
    in a full-size buffer instead (found after the first point, which is then evaluated again).
    """

    def __init__(self, model: nn.Module, directions: Sequence[Direction], keep_rows: bool = True) -> None:
        self.keep_rows = keep_rows
        self._terms: list[tuple[float, Direction]] = []
        self.params = perturbed_parameters(model)
        for d in directions:
            if set(d) != set(self.params):
                raise ValueError("a direction must have one tensor per parameter of the model")
        # only tensors that some direction moves: ignored ones (all-zero directions) stay untouched
        self.moving = [n for n in self.params if any(bool(d[n].any()) for d in directions)]
        self.directions = [{n: d[n] for n in self.moving} for d in directions]
        by_id = {id(self.params[n]): n for n in self.moving}
        self.owners: list[tuple[nn.Module, list[str]]] = []
        for m in model.modules():
            own = [by_id[id(p)] for p in m.parameters(recurse=False) if id(p) in by_id]
            if own:
                self.owners.append((m, own))
        self.w0: dict[str, torch.Tensor] = {}
        self.eager: set[str] = set()  # parameters set in full before the forward (not through a hook)
        self._seen: set[str] = set()
        self._rest: dict[str, torch.Tensor] = {}  # w0 + Σ_{k≥1} c_k d_k for the current row
        self._rest_key: tuple[float, ...] | None = None
        self._full: dict[str, torch.Tensor] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._c0 = 0.0
        self._src: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> Perturbation:
        self.w0 = {n: self.params[n].data for n in self.moving}
        self._src = self.w0
        for m, names in self.owners:
            self._hooks.append(m.register_forward_pre_hook(self._pre_hook(names)))
            self._hooks.append(m.register_forward_hook(self._post_hook(names)))
        return self

    def _target(self, n: str) -> torch.Tensor:
        w = self.w0[n]
        key = (tuple(w.shape), w.dtype, w.device)
        t = self._scratch.get(key)
        if t is None:
            t = self._scratch[key] = torch.empty_like(w)
        return t

    def _value(self, n: str, out: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(w0 + Σ_{k≥1} c_k d_k) + c_0 d_0`` for parameter ``n`` (only ``rows`` of it, when given), in
        ``out`` unless it is a kept tensor itself. The same adds in the same order whether the bracket is
        kept (a row) or summed here, so a point's weights do not depend on which."""
        def part(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]
        c0, d0 = self._c0, self.directions[0][n]
        if self._terms:  # the bracket is not kept: sum it into out first
            (c, d), *more = self._terms
            torch.add(part(self.w0[n]), part(d[n]), alpha=c, out=out)
            for c, d in more:
                out.add_(part(d[n]), alpha=c)
            return out.add_(part(d0), alpha=c0) if c0 != 0 else out
        if c0 == 0 and rows is None:
            return self._src[n]
        return torch.add(part(self._src[n]), part(d0), alpha=c0, out=out)

    def _pre_hook(self, names: list[str]) -> Callable[..., None]:
        @torch.no_grad()
        def hook(m: nn.Module, args: tuple) -> None:
            for n in names:
                if n in self.eager:
                    continue
                self._seen.add(n)
                t = self._target(n)
                if isinstance(m, nn.Embedding) and args and isinstance(args[0], torch.Tensor) and \
                        (self._c0 != 0 or self._terms):  # only the rows the lookup reads
                    rows = args[0].reshape(-1).unique()
                    t.index_copy_(0, rows, self._value(n, torch.empty_like(t[rows]), rows))
                else:
                    t = self._value(n, t)
                self.params[n].data = t
        return hook

    def _post_hook(self, names: list[str]) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            for n in names:
                if n not in self.eager:
                    self.params[n].data = self.w0[n]
        return hook

    @torch.no_grad()
    def set(self, coeffs: Sequence[float]) -> None:
        """The forward's weights to ``(w0 + Σ_{k≥1} c_k d_k) + c_0 d_0`` (exactly ``w0`` where every
        ``c_k`` is 0). The bracket is kept while ``c_1..`` stay the same (a row of a grid)."""
        if len(coeffs) != len(self.directions):
            raise ValueError(f"{len(coeffs)} coefficients for {len(self.directions)} directions")
        c0, rest = float(coeffs[0]), tuple(float(c) for c in coeffs[1:])
        src, self._terms = self.w0, []
        if any(rest):
            terms = [(c, d) for c, d in zip(rest, self.directions[1:], strict=True) if c != 0]
            if not self.keep_rows:
                self._terms = terms
            elif rest != self._rest_key:
                self._rest_key = None
                for n in self.moving:
                    r = self._rest.setdefault(n, torch.empty_like(self.w0[n]))
                    torch.add(self.w0[n], terms[0][1][n], alpha=terms[0][0], out=r)
                    for c, d in terms[1:]:
                        r.add_(d[n], alpha=c)
                self._rest_key = rest
            if self.keep_rows:
                src = self._rest
        self._c0, self._src = c0, src
        self._seen = set()
        for n in self.eager:
            if n not in self._full:
                self._full[n] = torch.empty_like(self.w0[n])
            self.params[n].data = self._value(n, self._full[n])

    def unseen(self) -> list[str]:
        """Moving parameters no hook set since the last :meth:`set`; they become eager from now on."""
        missed = [n for n in self.moving if n not in self.eager and n not in self._seen]
        self.eager.update(missed)
        return missed

    def restore(self) -> None:
        for n in self.moving:
            self.params[n].data = self.w0[n]

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self.restore()
        self._hooks, self._rest, self._rest_key, self._full, self._scratch = [], {}, None, {}, {}
        self.w0, self._src = {}, {}


def _load_state(path: Path | None, key: str, n: int) -> np.ndarray:
    losses = np.full(n, np.nan)
    if path is None or not path.exists():
        return losses
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key and z["losses"].shape == (n,):
                return z["losses"].astype(np.float64)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring the unreadable partial state %s: %s", path, e)
        return losses
    log.info("the partial state %s has other settings; starting afresh", path)
    return losses


def _save_state(path: Path | None, key: str, losses: np.ndarray, seconds: np.ndarray) -> None:
    if path is None:
        return
    with atomic_file(path) as f:
        np.savez(f, key=np.array(key), losses=losses, seconds=seconds)


def sweep(model: nn.Module, loss_fn: LossFn, directions: Sequence[Direction], coeffs: np.ndarray,
          state: str | Path | None = None, key: str = "", desc: str = "landscape",
          save_every: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Loss at each row of ``coeffs`` (N, k): ``L(θ0 + Σ_j coeffs[i, j]·d_j)``; returns (losses, seconds).

    With ``state``, the partial results are saved there every ``save_every`` seconds and on any exit
    (also Ctrl-C); a rerun with the same ``key`` resumes. The weights are restored on exit either way.
    """
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(len(coeffs), -1)
    path = Path(state) if state is not None else None
    losses = _load_state(path, key, len(coeffs))
    seconds = np.zeros(len(coeffs))
    todo = [i for i in range(len(coeffs)) if np.isnan(losses[i])]
    last_save = time.perf_counter()
    bar = progress(total=len(coeffs), initial=len(coeffs) - len(todo), desc=desc, unit="pt")
    try:
        rests = [tuple(c[1:]) for c in coeffs[todo].tolist()]
        runs = 1 + sum(a != b for a, b in zip(rests[:-1], rests[1:], strict=True))  # rows of equal c_1.., in order
        # keeping a row costs about two points' reads; worth it from rows of 3 points on
        with Perturbation(model, directions, keep_rows=len(todo) >= 3 * runs) as p:
            for k, i in enumerate(todo):
                t0 = time.perf_counter()
                p.set(coeffs[i].tolist())
                losses[i] = loss_fn(model)
                if k == 0 and (missed := p.unseen()):
                    log.info("%d parameter(s) used outside their module's forward are set in full: %s",
                             len(missed), ", ".join(missed[:3]))
                    p.set(coeffs[i].tolist())
                    losses[i] = loss_fn(model)
                seconds[i] = time.perf_counter() - t0
                bar.update(1)
                if path is not None and time.perf_counter() - last_save > save_every:
                    _save_state(path, key, losses, seconds)
                    last_save = time.perf_counter()
    finally:
        bar.close()
        if path is not None and todo:
            _save_state(path, key, losses, seconds)
    return losses, seconds


def grid_coeffs(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys)·len(xs), 2) coefficients, row-major: point (i, j) is (xs[j], ys[i])."""
    a, b = np.meshgrid(xs, ys)
    return np.stack([a.ravel(), b.ravel()], axis=1)


def sweep_grid(model: nn.Module, loss_fn: LossFn, d1: Direction, d2: Direction, xs: np.ndarray, ys: np.ndarray,
               **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Losses (len(ys), len(xs)) over the plane ``θ0 + x·d1 + y·d2``, and seconds per point."""
    losses, secs = sweep(model, loss_fn, [d1, d2], grid_coeffs(xs, ys), **kw)
    return losses.reshape(len(ys), len(xs)), secs.reshape(len(ys), len(xs))


def sweep_line(model: nn.Module, loss_fn: LossFn, d: Direction, xs: np.ndarray,
               **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Losses along ``θ0 + x·d`` at each ``x`` of ``xs``, and seconds per point."""
    return sweep(model, loss_fn, [d], np.asarray(xs).reshape(-1, 1), **kw)


def _bilinear(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, x: float, y: float) -> float:
    j = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    i = int(np.clip(np.searchsorted(ys, y) - 1, 0, len(ys) - 2))
    tx = (x - xs[j]) / (xs[j + 1] - xs[j])
    ty = (y - ys[i]) / (ys[i + 1] - ys[i])
    return float((1 - ty) * ((1 - tx) * z[i, j] + tx * z[i, j + 1]) + ty * ((1 - tx) * z[i + 1, j] + tx * z[i + 1, j + 1]))


def flatness(xs: np.ndarray, ys: np.ndarray | None, z: np.ndarray, base: float, radius: float,
             n_angles: int = 16) -> float | None:
    """Mean loss rise ``L − L0`` at distance ``radius`` from the centre, averaged over directions: the two
    ends of a line, or ``n_angles`` directions of the plane (bilinear interpolation); None off the range."""
    xs = np.asarray(xs, dtype=np.float64)
    if ys is None:
        if not (xs[0] <= -radius and radius <= xs[-1]):
            return None
        return float(np.mean([np.interp(-radius, xs, z), np.interp(radius, xs, z)]) - base)
    ys = np.asarray(ys, dtype=np.float64)
    if not (xs[0] <= -radius and radius <= xs[-1] and ys[0] <= -radius and radius <= ys[-1]):
        return None
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    vals = [_bilinear(xs, ys, z, radius * np.cos(t), radius * np.sin(t)) for t in angles]
    return float(np.mean(vals) - base)
