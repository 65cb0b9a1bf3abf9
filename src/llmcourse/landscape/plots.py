"""Pictures of a landscape: matplotlib contour and 3-D surface PNGs and a line plot, and, when plotly is
installed, interactive HTML pages (a 3-D surface beside its contour map, or a line) with plotly's script
embedded, so they work offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from llmcourse.core.io import write_text
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


def surface_html(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, path: Path, title: str = "",
                 labels: tuple[str, str] = ("α (d1)", "β (d2)"),
                 marks: dict[str, tuple[float, float]] | None = None) -> bool:
    """An interactive page: the 3-D surface (drag to turn it) beside its contour map, plotly's script
    embedded (works offline), written atomically; False when plotly is absent. The grid goes in as plain
    lists, so the page's JSON holds the losses as numbers."""
    if not plotly_available():
        return False
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x, y, zz = np.asarray(xs).tolist(), np.asarray(ys).tolist(), np.asarray(z).tolist()
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "xy"}]], column_widths=[0.55, 0.45],
                        subplot_titles=("surface", "contour"))
    fig.add_trace(go.Surface(x=x, y=y, z=zz, colorscale="Viridis", showscale=False,
                             contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}}},
                             hovertemplate="α %{x:.3g}<br>β %{y:.3g}<br>loss %{z:.5g}<extra></extra>"), 1, 1)
    fig.add_trace(go.Contour(x=x, y=y, z=zz, colorscale="Viridis", ncontours=30, colorbar={"title": "loss"},
                             hovertemplate="α %{x:.3g}<br>β %{y:.3g}<br>loss %{z:.5g}<extra></extra>"), 1, 2)
    for name, (mx, my) in (marks or {"θ0": (0.0, 0.0)}).items():
        fig.add_trace(go.Scatter(x=[mx], y=[my], mode="markers+text", text=[name], textposition="top right",
                                 marker={"color": "red", "symbol": "star", "size": 12}, showlegend=False), 1, 2)
    fig.update_layout(title=title or "loss surface", height=620,
                      scene={"xaxis_title": labels[0], "yaxis_title": labels[1], "zaxis_title": "loss"})
    fig.update_xaxes(title_text=labels[0], row=1, col=2)
    fig.update_yaxes(title_text=labels[1], row=1, col=2)
    write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return True


def line_html(xs: np.ndarray, losses: np.ndarray, path: Path, title: str = "", xlabel: str = "α",
              marks: dict[str, float] | None = None) -> bool:
    """An interactive line plot (plotly, script embedded), written atomically; False without plotly."""
    if not plotly_available():
        return False
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=np.asarray(xs).tolist(), y=np.asarray(losses).tolist(), mode="lines+markers",
                               hovertemplate="α %{x:.4g}<br>loss %{y:.5g}<extra></extra>"))
    for name, x in (marks or {"θ0": 0.0}).items():
        fig.add_vline(x=x, line_dash="dash", line_color="red", annotation_text=name)
    fig.update_layout(title=title or "loss along a line", xaxis_title=xlabel, yaxis_title="loss")
    write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return True
