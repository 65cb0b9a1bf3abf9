"""The `generate` / `chat` CLI contract, and the search-tree plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from llmcourse.cli import main
from llmcourse.decoding import GenerationConfig, generate
from llmcourse.decoding import tree as tree_mod


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # the core tests' GGUF writer
    from tiny_gguf import write_tiny_llama_gguf

    d = tmp_path_factory.mktemp("dec")
    write_tiny_llama_gguf(tiny_model("llama", vocab_size=256), d / "tiny.gguf")
    return d / "tiny.gguf"


@pytest.mark.parametrize("extra", [
    ["--strategy", "greedy"],
    ["--strategy", "beam", "--num-beams", "3", "--num-return-sequences", "2", "--early-stopping", "never",
     "--length-penalty", "0"],
    ["--strategy", "sample", "--seed", "1", "--top-k", "10", "--top-p", "0.9", "--min-p", "0.05", "--typical-p",
     "0.95", "--temperature", "0.7", "--repetition-penalty", "1.1", "--no-repeat-ngram-size", "3", "--chain",
     "llama.cpp"],
])
def test_generate_json_contract(tiny_path, tmp_path, capsys, extra) -> None:
    tree = tmp_path / "t.png"
    rc = main(["generate", "--model", str(tiny_path), "--prompt", "hello", "--max-new-tokens", "6", "--json",
               "--tree", str(tree), *extra])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert {"prompt_token_ids", "sequences", "tokens_per_second"} <= set(data)
    assert all(isinstance(t, int) for t in data["prompt_token_ids"])
    for s in data["sequences"]:
        assert set(s) >= {"token_ids", "text", "score"} and 1 <= len(s["token_ids"]) <= 6
        assert isinstance(s["text"], str) and isinstance(s["score"], float)
    assert data["tokens_per_second"] > 0
    assert tree.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,needle", [
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--strategy", "beam", "--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences"),
    (["--tree", "x.jpg"], "--tree"),
])
def test_generate_bad_input_is_one_line_exit_2(tiny_path, capsys, args, needle) -> None:
    rc = main(["generate", "--model", str(tiny_path), "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_generate_streams_text(tiny_path, capsys) -> None:
    assert main(["generate", "--model", str(tiny_path), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out


def test_chat_without_template_is_a_clean_error(tiny_path, capsys) -> None:
    assert main(["chat", "--model", str(tiny_path), "--prompt", "hi"]) == 2
    assert "chat template" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_one_turn_default_model(capsys) -> None:
    rc = main(["chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--seed", "0", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert "Paris" in data["reply"]


def test_beam_tree_marks_kept_finished_pruned(tmp_path) -> None:
    model = tiny_model("llama", seed=3, vocab_size=6)
    out = generate(model, None, [3, 4, 5], GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=5),
                   record=True)
    t = tree_mod.tree_from_beam(None, "prompt", out.beam)
    statuses = {n.status for n in t.nodes}
    assert {"root", "kept", "pruned"} <= statuses and "finished" in statuses
    # every returned hypothesis is a path of the tree ending in a finished node
    finished_paths = []
    for n in t.nodes:
        if n.status == "finished":
            path, m = [], n
            while m.parent is not None:
                path.append(int(m.label))
                m = t.nodes[m.parent]
            finished_paths.append(path[::-1])
    assert out.sequences[0].token_ids in finished_paths
    for suffix in ("png", "svg"):
        tree_mod.draw_tree(t, tmp_path / f"beam.{suffix}", "beam")
    assert (tmp_path / "beam.svg").read_text().lstrip().startswith("<?xml")


def test_layout_is_tidy() -> None:
    t = tree_mod.SearchTree()
    r = t.add(None, "r", None, "root")
    a = t.add(r, "a", 10.0, "chosen")
    t.add(r, "b", 5.0, "alternative")
    t.add(a, "c", 1.0, "chosen")
    t.add(a, "d", 2.0, "alternative")
    pos = tree_mod.layout(t)
    leaves = sorted(pos[i][1] for i in (2, 3, 4))
    assert leaves == [0.0, 1.0, 2.0]  # one row per leaf
    assert pos[a][1] == (pos[3][1] + pos[4][1]) / 2 and pos[a][0] == 1.0


def test_greedy_records_and_bars(tmp_path) -> None:
    model = tiny_model("llama")
    out = generate(model, None, [5, 6], GenerationConfig(strategy="sample", top_k=5, seed=0, max_new_tokens=3),
                   record=True)
    rec = out.records[0]
    assert len(rec) == 3 and all(r.kept == 5 for r in rec)
    assert all(sum(1 for p in r.processed_probs if p > 0) == 5 for r in rec)
    tree_mod.draw_step_bars(rec, None, tmp_path / "bars.png")
    tree_mod.draw_tree(tree_mod.tree_from_records(None, "p", rec), tmp_path / "tree.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000


def test_temperature_demo(tmp_path) -> None:
    table = tree_mod.draw_temperature(tmp_path / "t.svg")
    z = torch.tensor([1.5, -1.8, 0.9, -3.2], dtype=torch.float64)
    for t, probs in table.items():
        torch.testing.assert_close(torch.tensor(probs, dtype=torch.float64), torch.softmax(z / t, -1))
    assert max(table[0.5]) > max(table[1.0]) > max(table[2.0])


def test_node_labels_read_on_dark_faces():
    """Issue 30: black labels on dark-red nodes were hard to read; the label colour follows the face's luminance."""
    import matplotlib as mpl

    cmap = mpl.colormaps["RdYlGn"]
    assert tree_mod.label_color(cmap(0.0)) == "white" and tree_mod.label_color(cmap(0.05)) == "white"  # dark red
    assert tree_mod.label_color(cmap(1.0)) == "white"  # dark green
    assert tree_mod.label_color(cmap(0.5)) == "black" and tree_mod.label_color("#ddd") == "black"  # yellow, grey
