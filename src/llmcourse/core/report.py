"""What a lab needs to write its part of the course tour: the context, the section, tables and figures.

A lab's tour section is ``section(ctx: TourContext) -> TourSection``; it writes its files (plots)
into ``ctx.out_dir`` and references them by file name in its HTML fragment. ``llmcourse.tour``
runs the sections of the lab table and assembles the page; labs import only this module.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TourContext:
    """What every section gets: where to write files, the shared default model, the mode."""

    out_dir: Path  # write assets here; reference them in HTML by file name relative to index.html
    quick: bool  # tests: smallest meaningful run
    model_spec: str = "default"
    _lm: Any = None

    @property
    def lm(self):
        """The tour's model (fp32), loaded once and shared by all sections. Do not modify it."""
        if self._lm is None:
            from llmcourse.core.models import load_model

            self._lm = load_model(self.model_spec)
        return self._lm


@dataclass
class TourSection:
    title: str
    html: str  # an HTML fragment (no <html>/<body>); images as <img src="NAME.png">
    summary: dict[str, Any] = field(default_factory=dict)  # JSON-able figures for summary.json
    seconds: float = 0.0


def html_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A small HTML table from a list of dicts (floats shown with 4 significant digits)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: Path, name: str, alt: str = "", dpi: int = 110) -> str:
    """Save a matplotlib figure as ``out_dir/name``, close it, and return its ``<img>`` tag."""
    fig.savefig(Path(out_dir) / name, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return img(name, alt)


def img(name: str, alt: str = "") -> str:
    """An ``<img>`` tag for a file next to the page."""
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt or name)}"></p>'
