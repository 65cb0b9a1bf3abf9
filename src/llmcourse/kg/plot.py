"""Plots: a graph, or one question's retrieved subgraph, drawn subject -> object with each edge labelled
by its relation (the notebook's plot swaps object and relation), the facts given to the model highlighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcourse.core.io import atomic_file
from llmcourse.core.report import pyplot
from llmcourse.kg.qa import Asker
from llmcourse.kg.store import GraphStore
from llmcourse.kg.triples import Triple, normalize

MIN_GAP = 0.24  # least distance between two node centres, in units of the layout's larger side


def separate(pos: dict[Any, Any], min_gap: float = MIN_GAP, rounds: int = 200) -> dict[Any, tuple[float, float]]:
    """Push apart nodes closer than ``min_gap`` (times the layout's larger side) so that no two nodes overlap:
    a spring layout can put a leaf right on its neighbour (the Apple graph's "2023" on "Vision Pro")."""
    import numpy as np

    names = list(pos)
    xy = np.array([pos[n] for n in names], dtype=float)
    if len(names) < 2:
        return {n: tuple(p) for n, p in zip(names, xy, strict=True)}
    span = max(float(np.ptp(xy[:, 0])), float(np.ptp(xy[:, 1])), 1e-9)
    gap = min_gap * span
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        d = xy[:, None, :] - xy[None, :, :]  # (n, n, 2)
        dist = np.sqrt((d ** 2).sum(-1))
        np.fill_diagonal(dist, np.inf)
        close = dist < gap
        if not close.any():
            break
        same = dist < 1e-12  # coincident nodes: a random direction
        d[same] = rng.normal(size=(int(same.sum()), 2))
        dist = np.where(same, 1.0, dist)
        safe = np.where(close, dist, 1.0)
        push = np.where(close, (gap - safe) / 2 / safe, 0.0)[..., None] * d
        xy += push.sum(1)
    return {n: (float(x), float(y)) for n, (x, y) in zip(names, xy, strict=True)}


def layout(triples: list[Triple]) -> tuple[Any, dict[str, tuple[float, float]]]:
    """The graph of ``triples`` (a networkx MultiDiGraph, subject -> object) and its node positions: a
    spring layout, then :func:`separate`."""
    import networkx as nx

    g = nx.MultiDiGraph()
    for t in triples:
        g.add_edge(t.subject, t.object, key=t.relation)
    return g, separate(nx.spring_layout(g, seed=0, k=3.0 / max(1, len(g)) ** 0.5, iterations=300))


def draw(triples: list[Triple], highlight: set[tuple[str, str, str]] | None = None, title: str = "") -> Any:
    """A matplotlib figure of ``triples`` (:func:`layout`); edges in ``highlight`` are drawn red and thick."""
    import networkx as nx

    plt = pyplot()
    highlight = highlight or set()
    g, pos = layout(triples)
    fig, ax = plt.subplots(figsize=(11, 8))
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#cfe3f7", node_size=900, edgecolors="#4a7bb7")
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=8)
    hot = [(t.subject, t.object) for t in triples if (t.subject, t.relation, t.object) in highlight]
    cold = [(t.subject, t.object) for t in triples if (t.subject, t.relation, t.object) not in highlight]
    nx.draw_networkx_edges(g, pos, edgelist=cold, ax=ax, edge_color="#888", arrows=True, arrowsize=12,
                           node_size=900)
    nx.draw_networkx_edges(g, pos, edgelist=hot, ax=ax, edge_color="#d62728", width=2.5, arrows=True,
                           arrowsize=16, node_size=900)
    labels: dict[tuple[str, str], str] = {}
    for t in triples:  # several relations between one pair share one label, comma-separated
        key = (t.subject, t.object)
        labels[key] = f"{labels[key]}, {t.relation}" if key in labels else t.relation
    nx.draw_networkx_edge_labels(g, pos, edge_labels=labels, ax=ax, font_size=7, font_color="#333")
    ax.set_title(title or "knowledge graph (subject -> object, labelled by relation)")
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_graph(store: GraphStore, out: str | Path, question: str | None = None, hops: int = 2,
               max_edges: int = 60) -> dict[str, Any]:
    """Write a PNG of the graph (its first ``max_edges`` edges) or of ``question``'s retrieved subgraph."""
    from llmcourse.kg.store import neighbourhood

    highlight: set[tuple[str, str, str]] = set()
    if question:
        asker = Asker(store, llm=lambda p: "")
        linked, facts = asker.retrieve(question, hops)
        triples = [t for t, _ in neighbourhood(store, linked, hops)][:max_edges]
        highlight = {(f.subject, f.relation, f.object) for f in facts}
        title = f"{question}\n(red: the facts given to the model; linked: {', '.join(linked) or 'none'})"
    else:
        triples = store.triples()[:max_edges]
        title = ""
    shown = {(normalize(t.subject), t.relation, normalize(t.object)) for t in triples}
    for f in list(highlight):
        if (normalize(f[0]), f[1], normalize(f[2])) not in shown:
            triples.append(Triple(*f))
    fig = draw(triples, highlight, title)
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return {"out": str(out), "edges": len(triples), "highlighted": len(highlight)}
