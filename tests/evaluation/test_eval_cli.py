"""``llmcourse eval bench`` on a tiny random model folder: outputs, seeded samples, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_folder

from llmcourse.cli import main
from llmcourse.evaluation import commands
from llmcourse.evaluation.data import ENV


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny-eval"))


def test_bench_outputs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "bench", "--model", str(folder), "--tasks", "arc_easy,winogrande,mmlu_anatomy",
            "--limit", "3", "--seed", "7", "--threads", "1", "--json"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["files"]) == {"examples.jsonl", "results.json", "results.txt", "scores.png"}
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["task"] for r in rows} == {"arc_easy", "winogrande", "mmlu_anatomy"}
    res = {r["task"]: r for r in data["results"]}
    assert set(res["arc_easy"]["metrics"]) == {"acc", "acc_norm"} and set(res["winogrande"]["metrics"]) == {"acc"}
    arc = [r for r in rows if r["task"] == "arc_easy"]
    assert res["arc_easy"]["metrics"]["acc"] == pytest.approx(sum(r["acc"] for r in arc) / 3)
    assert data["examples_per_s"] > 0
    # the same seed draws the same documents and the same log-likelihoods
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in data["results"]]
    assert [r["doc_id"] for r in rows if r["task"] == "arc_easy"] == sorted(r["doc_id"] for r in arc)


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("bad, needles", [
    (["--tasks", "hellaswag,nope"], ["unknown task 'nope'", "arc_challenge", "mmlu_<subject>"]),
    (["--tasks", "piqa", "--limit", "0"], ["--limit 0"]),
    (["--tasks", "piqa", "--num-fewshot", "2", "--limit", "1"], ["few-shot"]),
])
def test_bad_input_one_line(folder, tmp_path, capsys, bad, needles):
    out = tmp_path / "out"
    _fails(capsys, ["eval", "bench", "--model", str(folder), *bad, "--out", str(out)], *needles)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_data_and_vocabulary(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    _fails(capsys, ["eval", "bench", "--model", str(folder), "--tasks", "piqa", "--out", str(out)], "LLMCOURSE_EVAL")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(ENV, str(tmp_path / "empty"))
    _fails(capsys, ["eval", "bench", "--model", str(folder), "--tasks", "piqa", "--out", str(out)], "missing")
    monkeypatch.delenv(ENV)
    small = tiny_folder(tmp_path / "small", vocab_size=256)  # SmolLM2's tokenizer: its ids cannot be scored
    _fails(capsys, ["eval", "bench", "--model", str(small), "--tasks", "piqa", "--limit", "1", "--out", str(out)],
           "vocabulary")
    assert not out.exists()


def test_leaderboard(folder, tmp_path, capsys, monkeypatch):
    """Two models on one table: the first is the KL reference; a bad spec fails before any output."""
    other = tiny_folder(tmp_path / "other", seed=1)
    out, cache = tmp_path / "lb", tmp_path / "cache"
    args = ["eval", "leaderboard", "--models", f"{folder},{other}", "--tasks", "arc_easy,piqa", "--limit", "2",
            "--ppl-tokens", "64", "--ppl-window", "32", "--decode-tokens", "3", "--threads", "1", "--json",
            "--cache", str(cache)]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    # --cache: a rerun reads every finished part back and loads no model; a missing part is computed again,
    # loading only the model it belongs to (its KL is cached, so not the reference)
    loads = []
    real = commands.load_model
    monkeypatch.setattr(commands, "load_model", lambda spec, **kw: loads.append(spec) or real(spec, **kw))
    assert main(args) == 0 and loads == []
    again = json.loads(capsys.readouterr().out)["rows"]
    assert again == rows
    part = next(Path(rows[1]["cache"]).glob("task-piqa-*.json"))
    part.unlink()
    assert main(args) == 0 and loads == [str(other)] and part.exists()
    redo = json.loads(capsys.readouterr().out)["rows"]
    assert redo[1]["piqa acc_norm"] == rows[1]["piqa acc_norm"] and redo[0] == rows[0]
    # --cached-only computes nothing: a task not in the cache is left out of the rows ('-' in the table)
    only = [a if a != "arc_easy,piqa" else "arc_easy,winogrande" for a in args] + ["--cached-only"]
    assert main(only) == 0 and loads == [str(other)]
    partial = json.loads(capsys.readouterr().out)["rows"]
    assert partial[1]["arc_easy acc_norm"] == rows[1]["arc_easy acc_norm"] and "winogrande acc" not in partial[1]
    assert [r["model"] for r in rows] == [str(folder), str(other)]
    assert rows[0]["kl"] == 0.0 and rows[0]["top1"] == 1.0 and rows[1]["kl"] > 0
    assert rows[0]["bytes"] > 0 and all(r["decode tok/s"] > 0 and "arc_easy acc_norm se" in r for r in rows)
    assert {p.name for p in out.iterdir()} >= {"leaderboard.json", "leaderboard.txt", "leaderboard.png"}
    _fails(capsys, ["eval", "leaderboard", "--models", f"{folder},{folder}", "--out", str(tmp_path / "x")],
           "twice")


def test_cached_only_without_cached_parts_fails(folder, tmp_path, capsys):
    """--cached-only on a missing or empty cache folder, or one that holds none of the board's parts: one line
    that names what is missing and the fix, exit 2, nothing at --out."""
    out, cache = tmp_path / "lb", tmp_path / "cache"
    args = ["eval", "leaderboard", "--models", str(folder), "--tasks", "piqa", "--limit", "2", "--threads", "1",
            "--cache", str(cache), "--cached-only", "--out", str(out)]
    _fails(capsys, args, f"{cache} does not exist", "run without --cached-only", "--cache")
    cache.mkdir()
    _fails(capsys, args, f"{cache} is empty", "run without --cached-only")
    (cache / "another-model-0123456789abcdef").mkdir()  # another board's parts
    _fails(capsys, args, "holds none", "measures, piqa", str(folder), "run without --cached-only")
    assert not out.exists() and not list(tmp_path.glob(".lb*"))
