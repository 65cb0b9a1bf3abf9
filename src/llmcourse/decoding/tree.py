"""Search trees and per-step probability charts, drawn with matplotlib (PNG or SVG, no graphviz).

What the course's notebook 1 draws, done right:

* **greedy / sampling** (:func:`tree_from_records`): the chosen path, each node labelled with its
  token and probability ``p(y_t | y_<t) * 100``, with the best unchosen alternatives of each step
  as side leaves (grey outline when the sampler chain filtered them out);
* **beam search** (:func:`tree_from_beam`): the real, pruned search of
  :func:`llmcourse.decoding.beam.beam_search` -- at every step the ``2K`` candidates, marked
  *kept* (runs on), *finished* (entered the finished set: thick outline) or *pruned* (dashed);
  nodes coloured by accumulated log-probability;
* **the notebook's full expansion** (:func:`expand_tree`): every node branches into ``b``
  children -- the ``b`` most likely tokens (``mode="beam"``: the notebook's "beam search", which
  is a full tree scored by ``sum log p / (prompt + generated tokens)``, not pruned beam search),
  or ``b`` tokens sampled after top-k or nucleus filtering (``mode="top-k"`` / ``"nucleus"``).
  The notebook's nucleus code indexed the *sorted* logits with vocabulary ids; here the
  filter works in vocabulary order (:func:`llmcourse.decoding.samplers.top_p`).

Layout is a pure-Python tidy tree: leaves take consecutive rows in depth-first order, a parent
sits at the mean of its children, depth runs left to right. Colours: red-yellow-green
(``RdYlGn``) with a colorbar titled "Token probability (%)" or "Sequence score".
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_file
from llmcourse.decoding import samplers


@dataclass
class TreeNode:
    id: int
    parent: int | None
    label: str
    value: float | None  # colour value: token probability in % or a score
    status: str  # root | chosen | alternative | filtered | kept | finished | pruned | best | leaf
    depth: int


@dataclass
class SearchTree:
    value_name: str = "Token probability (%)"
    nodes: list[TreeNode] = field(default_factory=list)

    def add(self, parent: int | None, label: str, value: float | None, status: str) -> int:
        depth = 0 if parent is None else self.nodes[parent].depth + 1
        self.nodes.append(TreeNode(len(self.nodes), parent, label, value, status, depth))
        return len(self.nodes) - 1

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            if n.parent is not None:
                out[n.parent].append(n.id)
        return out


def _tok(tokenizer: Any, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    # printable, and no "$" (matplotlib would read it as mathtext)
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text).replace("$", r"\$")
    return text or repr(text)


# --- builders -------------------------------------------------------------------------------------

def tree_from_records(tokenizer: Any, prompt: str, records: Sequence[Any], alternatives: int = 2) -> SearchTree:
    """The greedy/sampled path with the ``alternatives`` best unchosen tokens of each step."""
    tree = SearchTree("Token probability (%)")
    node = tree.add(None, prompt, None, "root")
    for rec in records:
        shown = 0
        for tid, p, pp in zip(rec.top_ids, rec.top_probs, rec.processed_probs, strict=True):
            if tid == rec.chosen or shown >= alternatives:
                continue
            tree.add(node, _tok(tokenizer, tid), 100 * p, "alternative" if pp > 0 else "filtered")
            shown += 1
        node = tree.add(node, _tok(tokenizer, rec.chosen), 100 * rec.chosen_prob, "chosen")
    return tree


def tree_from_beam(tokenizer: Any, prompt: str, recorder: Any, show_pruned: bool = True) -> SearchTree:
    """The real beam search: every step's ``2K`` candidates, kept / finished / pruned, by accumulated score."""
    tree = SearchTree("Sequence score (sum of log-probabilities)")
    root = tree.add(None, prompt, 0.0, "root")
    beams: list[int | None] = [root]  # the node of each running beam
    for cands, nxt in zip(recorder.steps, recorder.running_parents, strict=True):
        ids: list[int | None] = []
        for c in cands:
            parent = beams[c.parent] if c.parent < len(beams) else None
            if parent is None or c.score < -1e8 or (c.status == "pruned" and not show_pruned):
                ids.append(None)  # a placeholder beam (score -1e9) or a hidden pruned candidate
                continue
            ids.append(tree.add(parent, _tok(tokenizer, c.token), c.score, c.status))
        beams = [ids[j] if ids[j] is not None and cands[j].status == "kept" else None for j in nxt]
    return tree


def tree_from_output(out: Any, tokenizer: Any, cfg: Any) -> SearchTree:
    """The tree of a :func:`llmcourse.decoding.generate` run made with ``record=True``."""
    prompt = tokenizer.decode(out.prompt_token_ids) if tokenizer is not None else "prompt"
    prompt = prompt if len(prompt) <= 40 else "…" + prompt[-39:]
    if out.beam is not None:
        return tree_from_beam(tokenizer, prompt, out.beam)
    return tree_from_records(tokenizer, prompt, out.records[0] if out.records else [])


@torch.inference_mode()
def _next_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def expand_tree(model: Any, tokenizer: Any, prompt: str, depth: int = 5, branches: int = 2, mode: str = "beam",
                top_k: int = 20, top_p: float = 0.5, temperature: float = 1.0, seed: int = 0) -> SearchTree:
    """The notebook's full expansion: each node gets ``branches`` children, down to ``depth`` tokens.

    ``mode``: ``beam`` (the ``branches`` most likely tokens; nodes coloured by the notebook's
    sequence score ``cumulative log p / number of tokens including the prompt``, best leaf marked
    ``best``), ``top-k`` or ``nucleus`` (``branches`` tokens sampled with replacement from the
    filtered, tempered distribution; nodes coloured by token probability).
    """
    if mode not in ("beam", "top-k", "nucleus"):
        raise UserError(f"unknown expansion mode {mode!r}", "use beam, top-k or nucleus")
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = tokenizer(prompt).input_ids
    tree = SearchTree("Sequence score" if mode == "beam" else "Token probability (%)")
    root = tree.add(None, prompt, None, "root")
    frontier = [(root, prompt_ids, 0.0)]
    for level in range(depth):
        nxt = []
        for node, ids, cum in frontier:
            logits = _next_logits(model, ids)
            logp = torch.log_softmax(logits, dim=-1)
            if mode == "beam":
                picks = torch.topk(logits, branches).indices.tolist()
            else:
                z = samplers.temperature(logits[None], temperature)
                z = samplers.top_k(z, top_k) if mode == "top-k" else samplers.top_p(z, top_p)
                picks = torch.multinomial(torch.softmax(z, -1)[0], branches, replacement=True, generator=gen).tolist()
            for t in picks:
                c = cum + float(logp[t])
                new_ids = ids + [t]
                value = c / len(new_ids) if mode == "beam" else 100 * math.exp(float(logp[t]))
                status = "leaf" if level == depth - 1 else "kept"
                nxt.append((tree.add(node, _tok(tokenizer, t), value, status), new_ids, c))
        frontier = nxt
    if mode == "beam":
        best = max(frontier, key=lambda f: tree.nodes[f[0]].value)
        n = tree.nodes[best[0]]
        while n.parent is not None:
            n.status = "best"
            n = tree.nodes[n.parent]
    return tree


def best_path_text(tree: SearchTree) -> str:
    """The labels along the ``best`` (or ``chosen``) path, joined."""
    path = [n.label for n in tree.nodes if n.status in ("best", "chosen")]
    return "".join(p.replace("\\x0a", "\n").replace(r"\$", "$") for p in path)


# --- drawing --------------------------------------------------------------------------------------

def layout(tree: SearchTree) -> dict[int, tuple[float, float]]:
    """Tidy layout: (x = depth, y = row); leaves on consecutive rows, parents centred on their children."""
    kids = tree.children()
    pos: dict[int, tuple[float, float]] = {}
    row = 0.0

    def place(nid: int) -> float:
        nonlocal row
        ch = kids[nid]
        if not ch:
            y = row
            row += 1.0
        else:
            ys = [place(c) for c in ch]
            y = (min(ys) + max(ys)) / 2
        pos[nid] = (float(tree.nodes[nid].depth), y)
        return y

    stack_limit = max(1000, len(tree.nodes) + 100)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, stack_limit))
    try:
        for n in tree.nodes:
            if n.parent is None:
                place(n.id)
    finally:
        sys.setrecursionlimit(old)
    return pos


def _save(fig: Any, path: str | Path) -> None:
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise UserError(f"{path} must end in .png or .svg", "choose a .png or .svg file name")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=fig.dpi, bbox_inches="tight")
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


DPI = 110
MAX_PIXELS = 40_000_000  # 160 MB of RGBA: a 200-step sampled tree at 110 dpi was 700 Mpx (4.8 GB peak)


def _figure(w: float, h: float) -> Any:
    """A figure of ``w`` x ``h`` inches, its resolution lowered for big trees so the raster the renderer
    allocates (also for SVG: the tight bounding box is measured on an Agg canvas) stays under ``MAX_PIXELS``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = min(DPI, math.sqrt(MAX_PIXELS / (w * h)))
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def label_color(face: Any) -> str:
    """Black or white text, whichever reads better on ``face`` (any matplotlib colour): white when the
    face's relative luminance (WCAG: 0.2126 R + 0.7152 G + 0.0722 B of the linearised sRGB channels) is
    below 0.179, where white and black have equal contrast -- the dark reds and greens of ``RdYlGn``."""
    import matplotlib.colors as mcolors

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in mcolors.to_rgb(face))
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.179 else "black"


def draw_tree(tree: SearchTree, path: str | Path, title: str = "") -> None:
    """Draw ``tree`` to ``path`` (.png/.svg), nodes coloured by value with a red-yellow-green colorbar."""
    import matplotlib as mpl

    pos = layout(tree)
    n_rows = max((y for _, y in pos.values()), default=0) + 1
    max_depth = max((n.depth for n in tree.nodes), default=0)
    fig = _figure(1.7 * (max_depth + 1) + 2.5, max(3.0, 0.42 * n_rows + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    values = [n.value for n in tree.nodes if n.value is not None and n.status != "root"]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    norm = mpl.colors.Normalize(vmin=lo, vmax=hi)
    cmap = mpl.colormaps["RdYlGn"]
    for n in tree.nodes:
        if n.parent is not None:
            (x0, y0), (x1, y1) = pos[n.parent], pos[n.id]
            on_path = n.status in ("chosen", "best", "kept", "finished")
            ax.plot([x0, x1], [y0, y1], color="#444" if on_path else "#bbb", lw=1.4 if on_path else 0.8,
                    ls="-" if n.status not in ("pruned", "filtered") else ":", zorder=1)
    for n in tree.nodes:
        x, y = pos[n.id]
        face = "#ddd" if n.value is None or n.status == "root" else cmap(norm(n.value))
        edge = {"finished": ("black", 2.2, "-"), "best": ("black", 2.2, "-"), "chosen": ("black", 1.6, "-"),
                "pruned": ("#888", 0.8, "--"), "filtered": ("#888", 0.8, "--")}.get(n.status, ("#555", 0.8, "-"))
        if n.status == "root" or n.value is None:
            label = n.label
        elif "score" in tree.value_name.lower():
            label = f"{n.label}\n{n.value:.2f}"
        else:
            label = f"{n.label}\n{n.value:.1f}%"
        ax.text(x, y, label, ha="center", va="center", fontsize=8, zorder=2, color=label_color(face),
                bbox=dict(boxstyle="round,pad=0.3", fc=face, ec=edge[0], lw=edge[1], ls=edge[2],
                          alpha=0.55 if n.status in ("pruned", "filtered") else 1.0))
    ax.set_xlim(-0.7, max_depth + 0.7)
    ax.set_ylim(n_rows - 0.4, -0.6)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01).set_label(tree.value_name)
    _save(fig, path)


def draw_step_bars(records: Sequence[Any], tokenizer: Any, path: str | Path, title: str = "", top: int = 30) -> None:
    """One bar chart per step: the ``top`` most likely tokens, the chosen one in red, a dotted line at the cut-off."""
    n = max(1, len(records))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(5.2 * cols, 3.1 * rows)
    for i, rec in enumerate(records):
        ax = fig.add_subplot(rows, cols, i + 1)
        k = min(top, len(rec.top_ids))
        probs = [100 * p for p in rec.top_probs[:k]]
        colors = ["#d62728" if t == rec.chosen else ("#7f7f7f" if pp > 0 else "#d9d9d9")
                  for t, pp in zip(rec.top_ids[:k], rec.processed_probs[:k], strict=True)]
        ax.bar(range(k), probs, color=colors)
        ax.set_xticks(range(k))
        ax.set_xticklabels([_tok(tokenizer, t) for t in rec.top_ids[:k]], rotation=70, fontsize=7)
        kept = sum(1 for pp in rec.processed_probs[:k] if pp > 0)
        if kept < k:
            ax.axvline(kept - 0.5, color="black", ls=":", lw=1.2)
        ax.set_title(f"step {i + 1}: {_tok(tokenizer, rec.chosen)!r} ({100 * rec.chosen_prob:.1f}%), "
                     f"{rec.kept} kept", fontsize=8)
        ax.set_ylabel("probability (%)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def temperature_table(logits: Sequence[float] = (1.5, -1.8, 0.9, -3.2),
                      temperatures: Sequence[float] = (0.5, 1.0, 2.0)) -> dict[float, list[float]]:
    """softmax(logits / T) for each T (the notebook's temperature demo)."""
    z = torch.tensor([list(logits)], dtype=torch.float64)
    return {t: torch.softmax(samplers.temperature(z, t), dim=-1)[0].tolist() for t in temperatures}


def draw_temperature(path: str | Path, logits: Sequence[float] = (1.5, -1.8, 0.9, -3.2),
                     temperatures: Sequence[float] = (0.5, 1.0, 2.0)) -> dict[float, list[float]]:
    """Grouped bars of softmax(logits / T); returns the probabilities."""
    table = temperature_table(logits, temperatures)
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(table)
    import matplotlib as mpl

    cmap = mpl.colormaps["RdYlGn"]
    for j, (t, probs) in enumerate(table.items()):
        xs = [i + (j - (len(table) - 1) / 2) * width for i in range(len(logits))]
        ax.bar(xs, probs, width=width, label=f"T = {t:g}", color=cmap(j / max(1, len(table) - 1)), ec="#333")
    ax.set_xticks(range(len(logits)))
    ax.set_xticklabels([f"logit {v:g}" for v in logits])
    ax.set_ylabel("probability")
    ax.set_title("softmax(z / T): low T sharpens, high T flattens")
    ax.legend()
    _save(fig, path)
    return table
