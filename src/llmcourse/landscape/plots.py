"""Pictures of a landscape: matplotlib contour and 3-D surface PNGs, a line plot, and an interactive
3-D surface HTML (plotly's script embedded, so it works offline) when plotly is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from llmcourse.core.report import pyplot


def contour_png(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, path: Path, title: str = "",
                labels: tuple[str, str] = ("α (d1)", "β (d2)"),
                marks: dict[str, tuple[float, float]] | None = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    cs = ax.contourf(xs, ys, z, levels=30, cmap="viridis")
    ax.contour(xs, ys, z, levels=15, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(cs, ax=ax, label="loss")
    for name, (x, y) in (marks or {"θ0": (0.0, 0.0)}).items():
        ax.plot([x], [y], "r*", ms=10)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), color="red")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title or "loss contour")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def surface_png(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, path: Path, title: str = "") -> None:
    plt = pyplot()
    fig = plt.figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    a, b = np.meshgrid(xs, ys)
    ax.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title or "loss surface")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_png(xs: np.ndarray, losses: np.ndarray, path: Path, title: str = "", xlabel: str = "α",
             marks: dict[str, float] | None = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, losses, "o-", ms=3)
    for name, x in (marks or {"θ0": 0.0}).items():
        ax.axvline(x, color="red", lw=0.8, ls="--")
        ax.annotate(name, (x, float(np.nanmax(losses))), color="red", xytext=(3, -12), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title or "loss along a line")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plotly_available() -> bool:
    return importlib.util.find_spec("plotly") is not None


def surface_html(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, path: Path, title: str = "") -> bool:
    """An interactive 3-D surface with plotly's script embedded (no CDN); False when plotly is absent."""
    if not plotly_available():
        return False
    import plotly.graph_objects as go

    fig = go.Figure(data=[go.Surface(x=xs, y=ys, z=z, colorscale="Viridis")])
    fig.update_layout(title=title or "loss surface", scene={"xaxis_title": "α", "yaxis_title": "β",
                                                            "zaxis_title": "loss"})
    Path(path).write_text(fig.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")
    return True
