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

The loss is the mean next-token cross-entropy over eval windows (B, T) per point::

    L = −1/(B(T−1)) Σ_b Σ_{t<T} log p(x_{b,t+1} | x_{b,≤t})

Beyond its forward, a point costs the memory traffic of its weights (two reads per weight, about 1 GB
for a 135M model). :class:`PointBatch` amortises it over a grid row: ``k`` points of one row (same ``b``)
share one forward of the windows repeated ``k`` times (k·B, T), and each linear layer walks its weight in
chunks of output rows that stay in cache: per chunk ``r = w0 + b·d2`` once, then for each point
``t = r + a_j·d1`` and that point's matmul, so ``w0``, ``d1``, ``d2`` are read from memory once per row. The
adds are those of :class:`Perturbation` in the same order and each point's matmul runs on its own rows,
so a batched grid equals the one-point-per-forward grid (bit for bit on the tests' models; chunking the
output rows of a matmul leaves each output's reduction as it was).

A sweep can save its partial results (NaN where not done) to a state file as it goes (whole batches); a
rerun with the same settings key skips the points already done.
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


class WindowLoss:
    """The loss of a sweep: :func:`batched_loss` on fixed windows ``ids`` (B, T). It can also evaluate
    ``k`` points of a :class:`PointBatch` in one forward: the windows repeated ``k`` times (k·B, T),
    point ``j`` on rows ``j·B .. (j+1)·B``, each point's loss the same reduction as :func:`batched_loss`."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(1, -1)

    def __call__(self, model: nn.Module) -> float:
        return batched_loss(model, self.ids)

    def max_points(self, model: nn.Module, tokens: int = 4096, logit_bytes: int = 1 << 30) -> int:
        """How many points one forward may hold: at most ``tokens`` tokens and ``logit_bytes`` of logits."""
        b, t = self.ids.shape
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 65536)
        return max(1, min(tokens // (b * t), logit_bytes // (b * t * vocab * 4)))

    @torch.inference_mode()
    def points(self, model: nn.Module, k: int) -> list[float]:
        b, t = self.ids.shape
        if t < 2:
            raise UserError("the text has fewer than 2 tokens", "pass a longer text")
        logits = model(input_ids=self.ids.repeat(k, 1), use_cache=False).logits  # (k·B, T, V)
        target = self.ids[:, 1:].reshape(-1)
        return [float(F.cross_entropy(logits[j * b:(j + 1) * b, :-1].reshape(-1, logits.shape[-1]).float(), target))
                for j in range(k)]


def loss_on(ids: torch.Tensor) -> WindowLoss:
    """The loss function of a sweep: :func:`batched_loss` on fixed windows (batchable, see :class:`WindowLoss`)."""
    return WindowLoss(ids)


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


class PointBatch(Perturbation):
    """``k`` points of one grid row in one forward: point ``j`` sees ``w_j = (w0 + Σ_{i≥1} c_i d_i) + a_j·d_0``
    on its rows of the batch (k·B windows), the stored weights ``w0`` never written.

    Use as ``with PointBatch(model, [d1, d2]) as p: p.set_points([(a1, b), (a2, b)]); loss.points(model, 2)``.
    While the points are set, each module that owns a moving parameter runs in place of its forward:

    * a linear layer walks its weight in chunks of output rows (about ``chunk_bytes`` each; the default
      4 MiB keeps a chunk's r, d1 and t in L3 and leaves every layer of the default model whole but the
      tied head; 1 MiB chunks cost twice as many small ops and were slower here): per chunk the
      row ``r = w0 + b·d2`` is summed once into a cache-resident buffer, then for each point ``t = r + a_j d1``
      and ``y_j[:, rows] = x_j t^T (+ bias)`` while ``r`` and ``d1`` are still in cache. ``w0``, ``d1``, ``d2`` are
      read from memory once per batch instead of once per point, which is what a point costs beyond its
      forward (two reads per weight); the adds are those of :class:`Perturbation`, in the same order;
    * an embedding sums only the rows of each point's input ids;
    * any other module (norms, GPT-2's ``Conv1D``) runs once per point on its rows, its parameters pointed at
      that point's full weights.

    A point whose coefficients are all zero runs on ``w0`` itself. With no points set the modules run as
    usual (the stored weights). Which parameters a forward reached is kept as in :class:`Perturbation`
    (:meth:`unseen`); a parameter used outside its module's forward cannot be batched.
    """

    def __init__(self, model: nn.Module, directions: Sequence[Direction], chunk_bytes: int = 4 << 20) -> None:
        super().__init__(model, directions, keep_rows=False)
        self.chunk_bytes = chunk_bytes
        self._points: list[tuple[float, ...]] = []
        self._per_point = 1
        self._forwards: list[tuple[nn.Module, Any]] = []
        self._buf: dict[tuple, torch.Tensor] = {}

    def __enter__(self) -> PointBatch:
        self.w0 = {n: self.params[n].data for n in self.moving}
        for m, names in self.owners:
            self._forwards.append((m, m.__dict__.get("forward")))
            m.forward = self._forward(m, names, m.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, own in self._forwards:
            if own is None:
                del m.forward
            else:
                m.forward = own
        self.restore()
        self._forwards, self._buf, self._points, self.w0 = [], {}, [], {}

    def set_points(self, points: Sequence[Sequence[float]], rows: int = 1) -> None:
        """The next forward holds ``len(points)`` points, all with the same ``c_1..`` (one grid row), each on
        ``rows`` consecutive rows of the batch."""
        points = [tuple(float(c) for c in pt) for pt in points]
        if any(len(pt) != len(self.directions) for pt in points):
            raise ValueError(f"points need {len(self.directions)} coefficients each")
        if len({pt[1:] for pt in points}) > 1:
            raise ValueError("the points of one batch must share c_1.. (one row of the grid)")
        self._points, self._per_point = points, rows
        self._seen = set()

    def clear(self) -> None:
        self._points = []

    def _scratch_for(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        t = self._buf.get(key)
        if t is None or t.shape != like.shape:
            t = self._buf[key] = torch.empty_like(like)
        return t

    def _sum(self, n: str, c0: float, out: torch.Tensor, part: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(w0 + Σ_{i≥1} c_i d_i) + c0·d0`` of ``part`` of parameter ``n`` (into ``out`` unless it is ``w0``):
        the adds of :meth:`Perturbation._value`, in its order."""
        rest = [(c, d) for c, d in zip(self._points[0][1:], self.directions[1:], strict=True) if c != 0]
        if not rest and c0 == 0:
            return part(self.w0[n])
        (c, d), *more = rest or [(c0, self.directions[0])]
        torch.add(part(self.w0[n]), part(d[n]), alpha=c, out=out)
        for c, d in more:
            out.add_(part(d[n]), alpha=c)
        return out.add_(part(self.directions[0][n]), alpha=c0) if rest and c0 != 0 else out

    def _forward(self, m: nn.Module, names: list[str], orig: Callable[..., Any]) -> Callable[..., Any]:
        name_of = {id(self.params[n]): n for n in names}
        weight = name_of.get(id(getattr(m, "weight", None)))
        bias = name_of.get(id(getattr(m, "bias", None)))

        @torch.no_grad()
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._points:
                return orig(*args, **kwargs)
            self._seen.update(names)
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1 and args[0].shape[0] == 1:
                # shared by every row (GPT-2's position ids): each point's rows get their own output
                args = (args[0].expand(len(self._points) * self._per_point, *args[0].shape[1:]), *args[1:])
            if type(m) is nn.Linear and len(args) == 1 and not kwargs:
                return self._linear(m, weight, bias, args[0])
            if type(m) is nn.Embedding and weight is not None and m.max_norm is None and len(args) == 1 \
                    and not kwargs:
                return self._embedding(m, weight, args[0])
            return self._each(names, orig, args, kwargs)
        return forward

    def _linear(self, m: nn.Linear, wn: str | None, bn: str | None, x: torch.Tensor) -> torch.Tensor:
        k = len(self._points)
        xs = x.reshape(k, -1, x.shape[-1])  # (k, n·T, in): point j's rows
        w = self.w0[wn] if wn else m.weight
        n_out = w.shape[0]
        biases = [None] * k if m.bias is None else \
            [self._sum(bn, pt[0], self._scratch_for(("bias", j, bn), m.bias), lambda t: t) if bn else m.bias
             for j, pt in enumerate(self._points)]
        if wn is None:
            return torch.stack([F.linear(xs[j], w, biases[j]) for j in range(k)]).reshape(*x.shape[:-1], n_out)
        y = x.new_empty(k, xs.shape[1], n_out)
        step = max(1, self.chunk_bytes // (w[0].numel() * w.element_size()))
        for r0 in range(0, n_out, step):
            r1 = min(n_out, r0 + step)
            rows = slice(r0, r1)

            def part(t: torch.Tensor, rows: slice = rows) -> torch.Tensor:
                return t[rows]
            r = self._sum(wn, 0.0, self._scratch_for(("row", r1 - r0), w[rows]), part)  # w0 + b·d2, once
            d0 = self.directions[0][wn][rows]
            for j, pt in enumerate(self._points):
                t = r if pt[0] == 0 else torch.add(r, d0, alpha=pt[0], out=self._scratch_for(("t", r1 - r0), r))
                y[j, :, rows] = F.linear(xs[j], t, None if biases[j] is None else biases[j][rows])
        return y.reshape(*x.shape[:-1], n_out)

    def _embedding(self, m: nn.Embedding, wn: str, ids: torch.Tensor) -> torch.Tensor:
        k = len(self._points)
        out = []
        for j, pt in enumerate(ids.reshape(k, -1, *ids.shape[1:])):
            rows, inv = pt.reshape(-1).unique(return_inverse=True)

            def part(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                return t[rows]
            vals = self._sum(wn, self._points[j][0], torch.empty_like(self.w0[wn][rows]), part)  # (U, H)
            out.append(vals[inv].reshape(*pt.shape, -1))
        return torch.cat(out)

    def _each(self, names: list[str], orig: Callable[..., Any], args: tuple, kwargs: dict) -> torch.Tensor:
        k = len(self._points)
        rows = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0] // k

        def mine(a: Any, j: int) -> Any:
            return a[j * rows:(j + 1) * rows] if isinstance(a, torch.Tensor) and a.shape[:1] == (k * rows,) else a
        outs = []
        try:
            for j, pt in enumerate(self._points):
                for i, n in enumerate(names):
                    self.params[n].data = self._sum(n, pt[0], self._scratch_for(("each", i, *self.w0[n].shape), self.w0[n]),
                                                    lambda t: t)
                outs.append(orig(*(mine(a, j) for a in args), **{key: mine(a, j) for key, a in kwargs.items()}))
        finally:
            for n in names:
                self.params[n].data = self.w0[n]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError("a perturbed module returned no tensor; sweep with batch=1")
        return torch.cat(outs)


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


def _rows(coeffs: np.ndarray, todo: list[int], size: int) -> list[list[int]]:
    """``todo`` cut into batches of at most ``size`` consecutive points sharing ``c_1..`` (a grid row); a
    point whose coefficients are all zero goes alone (it runs on the stored weights, unbatched)."""
    out: list[list[int]] = []
    for i in todo:
        last = out[-1] if out else None
        zero = not coeffs[i].any()
        if last is None or zero or not coeffs[last[0]].any() or len(last) >= size or \
                not np.array_equal(coeffs[last[0], 1:], coeffs[i, 1:]):
            out.append([i])
        else:
            last.append(i)
    return out


def sweep(model: nn.Module, loss_fn: LossFn, directions: Sequence[Direction], coeffs: np.ndarray,
          state: str | Path | None = None, key: str = "", desc: str = "landscape",
          save_every: float = 2.0, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss at each row of ``coeffs`` (N, k): ``L(θ0 + Σ_j coeffs[i, j]·d_j)``; returns (losses, seconds).

    A :class:`WindowLoss` evaluates up to ``batch`` points of a grid row per forward (:class:`PointBatch`;
    default: as many as :meth:`WindowLoss.max_points` allows; 1 = one point per forward through
    :class:`Perturbation`); any other ``loss_fn(model)`` one point per call. With ``state``, the partial
    results are saved there every ``save_every`` seconds (whole batches) and on any exit (also Ctrl-C); a
    rerun with the same ``key`` resumes. The weights are restored on exit either way.
    """
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(len(coeffs), -1)
    path = Path(state) if state is not None else None
    losses = _load_state(path, key, len(coeffs))
    seconds = np.zeros(len(coeffs))
    todo = [i for i in range(len(coeffs)) if np.isnan(losses[i])]
    last_save = time.perf_counter()
    bar = progress(total=len(coeffs), initial=len(coeffs) - len(todo), desc=desc, unit="pt")

    def record(idx: list[int], vals: Sequence[float], t0: float) -> None:
        nonlocal last_save
        losses[idx], seconds[idx] = vals, (time.perf_counter() - t0) / len(idx)
        bar.update(len(idx))
        if path is not None and time.perf_counter() - last_save > save_every:
            _save_state(path, key, losses, seconds)
            last_save = time.perf_counter()

    try:
        size = batch if batch is not None else loss_fn.max_points(model) if isinstance(loss_fn, WindowLoss) else 1
        left = todo
        if isinstance(loss_fn, WindowLoss) and size > 1:
            left = _sweep_batched(model, loss_fn, directions, coeffs, _rows(coeffs, todo, size), record)
        _sweep_points(model, loss_fn, directions, coeffs, left, record)
    finally:
        bar.close()
        if path is not None and todo:
            _save_state(path, key, losses, seconds)
    return losses, seconds


Record = Callable[[list[int], Sequence[float], float], None]


def _sweep_batched(model: nn.Module, loss_fn: WindowLoss, directions: Sequence[Direction], coeffs: np.ndarray,
                   batches: list[list[int]], record: Record) -> list[int]:
    """Each batch in one forward (:class:`PointBatch`); returns the points left to evaluate one by one:
    none, or all of them when some parameter is used outside its module (the batch cannot reach it)."""
    with PointBatch(model, directions) as p:
        for n, idx in enumerate(batches):
            t0 = time.perf_counter()
            if not coeffs[idx[0]].any():
                p.clear()
                vals = [loss_fn(model)]  # the centre: the stored weights, as the base loss
            else:
                p.set_points(coeffs[idx].tolist(), rows=len(loss_fn.ids))
                vals = loss_fn.points(model, len(idx))
                if missed := p.unseen():
                    log.info("%d parameter(s) used outside their module's forward; one point per forward: %s",
                             len(missed), ", ".join(missed[:3]))
                    return [i for b in batches[n:] for i in b]
            record(idx, vals, t0)
    return []


def _sweep_points(model: nn.Module, loss_fn: LossFn, directions: Sequence[Direction], coeffs: np.ndarray,
                  todo: list[int], record: Record) -> None:
    """One point per forward (:class:`Perturbation`)."""
    if not todo:
        return
    rests = [tuple(c[1:]) for c in coeffs[todo].tolist()]
    runs = 1 + sum(a != b for a, b in zip(rests[:-1], rests[1:], strict=True))  # rows of equal c_1.., in order
    # keeping a row costs about two points' reads; worth it from rows of 3 points on
    with Perturbation(model, directions, keep_rows=len(todo) >= 3 * runs) as p:
        for k, i in enumerate(todo):
            t0 = time.perf_counter()
            p.set(coeffs[i].tolist())
            loss = loss_fn(model)
            if k == 0 and (missed := p.unseen()):
                log.info("%d parameter(s) used outside their module's forward are set in full: %s",
                         len(missed), ", ".join(missed[:3]))
                p.set(coeffs[i].tolist())
                loss = loss_fn(model)
            record([i], [loss], t0)


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
