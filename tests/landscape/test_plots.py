"""The interactive plotly pages: written, offline (script embedded), holding the grid's losses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llmcourse.landscape.plots import line_html, surface_html

pytest.importorskip("plotly")


def _traces(html: str) -> list[dict]:
    # plotly.newPlot("id", [traces...], {layout}, ...): the traces are the second argument
    m = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\])\s*,\s*\{"template"', html, re.S)
    assert m, "no plotly figure in the page"
    return json.loads(m.group(1))


def test_surface_html_holds_the_grid(tmp_path):
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 4)
    z = np.arange(12, dtype=np.float64).reshape(4, 3) / 7 + 2.0
    path = tmp_path / "surface.html"
    assert surface_html(xs, ys, z, path, "t")
    html = path.read_text(encoding="utf-8")
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js embedded: works offline
    traces = _traces(html)
    kinds = [t["type"] for t in traces]
    assert kinds[:2] == ["surface", "contour"]
    for t in traces[:2]:
        np.testing.assert_array_equal(np.array(t["z"]), z)
        np.testing.assert_array_equal(np.array(t["x"]), xs)
        np.testing.assert_array_equal(np.array(t["y"]), ys)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_line_html_holds_the_losses(tmp_path):
    xs, z = np.linspace(0, 1, 5), np.array([3.0, 2.5, 2.25, 2.5, 3.125])
    path = tmp_path / "line.html"
    assert line_html(xs, z, path)
    (t,) = _traces(path.read_text(encoding="utf-8"))
    np.testing.assert_array_equal(np.array(t["y"]), z)
