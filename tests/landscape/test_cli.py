"""``llmcourse landscape`` on a tiny random model folder: outputs, interpolation, one-line errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import tiny_folder

from llmcourse.cli import main

ARGS = ["--windows", "2", "--window", "16", "--grid", "3", "--json"]


def _folder(path, seed=0, **kw):
    return tiny_folder(path, seed=seed, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return _folder(d / "a", 0), _folder(d / "b", 1), _folder(d / "small", 0, intermediate_size=96)


def test_grid_outputs(folders, tmp_path, capsys):
    a, _, _ = folders
    out = tmp_path / "out"
    assert main(["landscape", "--model", str(a), "--out", str(out), *ARGS]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"surface.npz", "surface.csv", "landscape.json", "contour.png", "surface.png"} <= set(data["files"])
    assert all((out / f).is_file() for f in data["files"])
    assert data["centre_loss"] == data["base_loss"]
    with np.load(out / "surface.npz") as z:
        assert z["losses"].shape == (3, 3) and z["losses"][1, 1] == data["base_loss"]
    assert json.loads((out / "landscape.json").read_text())["norm"] == "filter"
    if importlib.util.find_spec("plotly"):
        assert "surface.html" in data["files"]
        assert f"{data['losses'][1][1]!r}" in (out / "surface.html").read_text(encoding="utf-8")
    assert not list(tmp_path.glob(".*partial*"))


def test_line_towards_model_b(folders, tmp_path, capsys):
    a, b, _ = folders
    out = tmp_path / "line"
    assert main(["landscape", "--model", str(a), "--model-b", str(b), "--line", "--range", "0", "1",
                 "--out", str(out), *ARGS]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["losses"][0] == data["base_loss"]
    assert data["losses"][-1] == pytest.approx(data["other_losses"]["B"], abs=1e-5)
    assert (out / "line.png").is_file()
    if importlib.util.find_spec("plotly"):
        assert "line.html" in data["files"] and (out / "line.html").is_file()


@pytest.mark.parametrize("extra", [
    ["--grid", "1"], ["--range", "1", "1"], ["--range", "1", "-1"], ["--text", "I"], ["--model-b", "SMALL"],
    ["--model-c", "SMALL"],
])
def test_bad_input_one_line_exit_2(folders, tmp_path, capsys, extra):
    a, _, small = folders
    extra = [str(small) if e == "SMALL" else e for e in extra]
    out = tmp_path / "bad"
    try:
        code = main(["landscape", "--model", str(a), "--out", str(out), "--windows", "1", "--window", "16", *extra])
    except SystemExit as e:  # argparse's one-line error
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) <= 2, err  # argparse: usage + one line; ours: one line
    assert not out.exists() and not list(tmp_path.glob(".*"))
