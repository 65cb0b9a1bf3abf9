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
class EvalSpan:
    """Token ids (1, n) of the eval split and the window / stride they are scored with."""

    ids: Any
    max_length: int
    stride: int

    @property
    def caption(self) -> str:
        return (f"the first {self.ids.shape[1]:,} tokens of the eval split, window {self.max_length:,}, "
                f"stride {self.stride:,}")


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

    _span: Any = None
    _reference: Any = None

    @property
    def span(self) -> EvalSpan:
        """The one evaluation span every section scores perplexity on, so that all fp32 figures agree."""
        if self._span is None:
            from llmcourse.core.data import load_text, tokenize_stream

            n, window, stride = (256, 128, 64) if self.quick else (2048, 1024, 512)
            ids = tokenize_stream(self.lm.tokenizer, load_text("default", "eval"))[:, :n]
            self._span = EvalSpan(ids, window, stride)
        return self._span

    def perplexity(self, model: Any) -> dict[str, Any]:
        """Perplexity of ``model`` on :attr:`span` (the Hugging Face recipe)."""
        from llmcourse.core.evaluate import perplexity

        sp = self.span
        return perplexity(model, sp.ids, max_length=sp.max_length, stride=sp.stride)

    @property
    def reference(self) -> dict[str, Any]:
        """The fp32 model's perplexity on :attr:`span`, computed once: the reference of every table."""
        if self._reference is None:
            self._reference = self.perplexity(self.lm.model)
        return self._reference


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


def fmt(value: Any, unit: str = "") -> str:
    """A number as people read it: thousands separators, 4 significant digits, bytes in MB/GB."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if unit == "bytes":
        v = float(value)
        return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"
    if isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    else:
        return html.escape(str(value))
    return f"{text} {unit}".strip()


def img(name: str, alt: str = "") -> str:
    """An ``<img>`` tag for a file next to the page."""
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt or name)}"></p>'
