"""Model resolution, conversion and the CLI's error contract (one line, exit 2, no partial output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_gguf import write_tiny_llama_gguf

from llmcourse.cli import main
from llmcourse.core.errors import UserError
from llmcourse.core.models import load_model


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmcourse", *args], capture_output=True, text=True, env=e, timeout=300)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    model = tiny_model("llama", vocab_size=256)
    write_tiny_llama_gguf(model, d / "tiny.gguf")
    return d / "tiny.gguf", model


def test_gguf_loads_to_same_logits(tiny_gguf):
    path, model = tiny_gguf
    lm = load_model(str(path))
    x = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(lm.model(x).logits, model(x).logits, rtol=0, atol=0)
    assert lm.kind == "gguf"


def test_convert_hf_roundtrip_and_bf16(tiny_gguf, tmp_path, capsys):
    path, model = tiny_gguf
    out = tmp_path / "hf"
    assert main(["convert", "hf", "--model", str(path), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] > 0 and (out / "model.safetensors").exists() and (out / "config.json").exists()
    lm = load_model(str(out))
    x = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(lm.model(x).logits, model(x).logits, rtol=0, atol=0)
    out16 = tmp_path / "hf16"
    assert main(["convert", "hf", "--model", str(path), "--out", str(out16), "--dtype", "bf16"]) == 0
    assert load_model(str(out16), dtype="bf16").model.dtype == torch.bfloat16


def test_convert_refuses_to_overwrite_input(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    assert main(["convert", "hf", "--model", str(path), "--out", str(path.parent)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert path.exists()


def test_pickle_needs_trust(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=False)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    if not list(tmp_path.glob("*.bin")):
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_clean_error():
    r = cli("models", "--model", "someone/some-model")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "local folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["eval", "perplexity", "--model", "/nonexistent/dir"], "does not exist"),
    (["eval", "perplexity", "--data", "/nonexistent.txt"], "does not exist"),
    (["eval", "perplexity", "--stride", "-3"], "--stride"),
    (["eval", "perplexity", "--max-length", "100000"], "context"),
    (["eval", "perplexity", "--dtype", "fp8"], "invalid choice"),
])
def test_cli_bad_input_one_line_exit_2(args, needle):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_debug_shows_traceback():
    r = cli("eval", "perplexity", "--model", "/nonexistent/dir", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_corrupt_gguf_cli_leaves_no_output(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:1000])
    out = tmp_path / "out"
    r = cli("convert", "hf", "--model", str(bad), "--out", str(out))
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow
def test_cli_perplexity_json_contract():
    r = cli("eval", "perplexity", "--max-tokens", "300", "--max-length", "128", "--stride", "64", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data["perplexity"], float) and data["tokens"] == 299


@pytest.mark.slow
def test_default_eval_split_has_10k_tokens(default_lm):
    from llmcourse.core.data import load_text, tokenize_stream

    assert tokenize_stream(default_lm.tokenizer, load_text("default", "eval")).shape[1] >= 10_000


@pytest.mark.slow
def test_tour_quick(tmp_path):
    from llmcourse.tour import run_tour

    s = run_tour(tmp_path / "tour", quick=True, sections=["llmcourse.core.tour_section:section"])
    page = (tmp_path / "tour" / "index.html").read_text()
    assert "SmolLM2" in page and "Paris" in s["sections"]["The model"]["chat_sample"]
    assert json.loads((tmp_path / "tour" / "summary.json").read_text())["sections"]["The model"]["perplexity"] > 1
    assert not [p for p in Path(tmp_path).iterdir() if p.name.endswith(".part")]
