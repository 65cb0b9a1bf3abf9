"""The GGUF commands' boundaries: an int8 folder is de-quantized before `convert gguf`, no input is overwritten."""

from __future__ import annotations

import subprocess
import sys

from conftest import tiny_model
from gguf_helpers import byte_tokenizer

from llmcourse.core.gguf_container import read_gguf_header

TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcourse", *args], capture_output=True, text=True, timeout=300)


def test_convert_gguf_dequantizes_an_int8_folder_and_quantize_keeps_the_imatrix(tmp_path):
    hf = tmp_path / "hf"
    tiny_model("llama", **TINY).save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    r = _cli("quantize", "int8", "--model", str(hf), "--out", str(tmp_path / "int8"))
    assert r.returncode == 0, r.stderr
    r = _cli("convert", "gguf", "--model", str(tmp_path / "int8"), "--out", str(tmp_path / "x.gguf"),
             "--tokenizer-pre", "gpt-2")
    assert r.returncode == 0, r.stderr
    assert "de-quantized" in r.stdout
    names = [t.name for t in read_gguf_header(tmp_path / "x.gguf")[1]]
    assert "blk.0.attn_q.weight" in names and not any("qweight" in n or n.endswith(".scale") for n in names)

    d = tmp_path / "d"
    d.mkdir()
    im = d / "x.gguf"
    im.write_bytes(b"GGUF-imatrix-stand-in")
    r = _cli("quantize", "gguf", "--model", str(tmp_path / "x.gguf"), "--type", "Q8_0", "--imatrix", str(im),
             "--out", str(d), "--overwrite")
    assert r.returncode == 2 and r.stderr.count("\n") <= 2, r.stderr
    assert im.read_bytes() == b"GGUF-imatrix-stand-in"
