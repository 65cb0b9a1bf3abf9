"""Never destroy the user's files, never load a broken checkpoint as random weights (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from llmcourse.cli import main
from llmcourse.core.errors import UserError
from llmcourse.core.models import load_model


@pytest.fixture()
def hf_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "model"
    tiny_model("llama", seed=1).save_pretrained(d, safe_serialization=True)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    return d


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_out_inside_or_above_an_input_is_refused(hf_dir: Path, capsys) -> None:
    before = _snapshot(hf_dir.parent)
    for out in (hf_dir, hf_dir / "sub", hf_dir.parent, hf_dir / "model.safetensors"):
        assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(out), "--overwrite"]) == 2
        assert "input" in _err(capsys)
    assert main(["tour", "--quick", "--model", str(hf_dir), "--out", str(hf_dir)]) == 2
    assert "input" in _err(capsys)
    assert _snapshot(hf_dir.parent) == before


def test_existing_out_needs_overwrite_and_our_marker(hf_dir: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "my_thesis.txt").write_text("years of work")
    assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(mine)]) == 2
    assert "--overwrite" in _err(capsys)
    assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(mine), "--overwrite"]) == 2
    assert "did not write" in _err(capsys)
    assert (mine / "my_thesis.txt").read_text() == "years of work"
    ours = tmp_path / "ours"
    assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(ours)]) == 0
    assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(ours)]) == 2  # exists
    capsys.readouterr()
    assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(ours), "--overwrite"]) == 0
    assert (ours / "model.safetensors").exists()


def test_the_model_cache_is_never_an_output(hf_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LLMCOURSE_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    cache.mkdir(parents=True)
    for out in (cache, tmp_path / "home"):
        assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(out), "--overwrite"]) == 2
        assert "model cache" in _err(capsys)


def _rewrite(d: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    state = load_file(str(f))
    save_file(fn(state), str(f), metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors_are_refused(hf_dir: Path) -> None:
    load_model(str(hf_dir))  # the intact folder loads
    _rewrite(hf_dir, lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(UserError, match="missing tensors"):
        load_model(str(hf_dir))
    _rewrite(hf_dir, lambda s: {**s, "model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64),
                                "model.layers.9.extra.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="unexpected tensors"):
        load_model(str(hf_dir))
    _rewrite(hf_dir, lambda s: {**{k: v for k, v in s.items() if "extra" not in k},
                                "model.layers.1.mlp.up_proj.weight": torch.zeros(64, 128)})
    with pytest.raises(UserError, match="shapes that differ"):
        load_model(str(hf_dir))


@pytest.mark.parametrize("change", [{"num_hidden_layers": 3}, {"num_hidden_layers": 1}, {"model_type": "qwen2"},
                                    {"num_attention_heads": 0}, {"hidden_size": None}])
def test_config_that_does_not_match_the_weights_is_refused(hf_dir: Path, change: dict) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError):
        load_model(str(hf_dir))


# --- issue 31: output modes under the umask; a tour with a failed section ----------------------------------------

def test_outputs_get_the_umask_mode(hf_dir: Path, tmp_path: Path) -> None:
    """safetensors writes through a 0600 temporary file: model.safetensors used to be 0600 under umask 0022."""
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "conv"
        assert main(["convert", "hf", "--model", str(hf_dir), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


def _ok_section(ctx):
    from llmcourse.core.report import TourSection

    return TourSection("Fine section", "<p>fine</p>", {"x": 1})


def _failing_section(ctx):
    raise UserError("this section needs a wider model", "use --model default")


def test_a_failed_tour_section_is_one_stderr_line_and_no_page_claims_success(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    import llmcourse.tour as tour
    from llmcourse.core.lab import Lab

    labs = [(Lab(name="fine", title="Fine"), "test_outputs_safety:_ok_section"),
            (Lab(name="wide", title="Wide"), "test_outputs_safety:_failing_section")]
    monkeypatch.setattr(tour, "tour_sections", lambda: labs)
    out = tmp_path / "tour"
    assert main(["tour", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a wider model" in err and err.startswith("llmcourse: error:"), err
    page = (out / "index.html").read_text()
    assert "1 section(s) failed: Wide" in page and page.index("section(s) failed") < page.index("<section")
    assert json.loads((out / "summary.json").read_text())["failed"] == ["wide"]
