"""llama.cpp presets: per-tensor types and whole files against ``llama_model_quantize``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_model
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf_helpers import byte_tokenizer, llama_logits, llama_quantize, tensor_table

from llmcourse.core.gguf_container import KV, read_gguf_header
from llmcourse.quant.gguf.convert import convert_to_gguf as convert
from llmcourse.quant.gguf.presets import (
    COURSE_PRESETS,
    ModelShape,
    fallback_note,
    get_preset,
    quantize_gguf,
    quantized_file,
    tensor_types,
    use_more_bits,
)

ALL = COURSE_PRESETS + ["Q3_K", "Q4_K", "Q5_K"]
# rows of 256 and 512 values (whole k-quant blocks); qwen2 with 8 query heads per 2 kv heads (GQA 4)
TINY = {
    "llama": dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.2),
    "qwen2": dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.2),
    "gpt2": dict(vocab_size=264, n_embd=256, n_layer=8, n_head=4, bos_token_id=1, eos_token_id=2,
                 initializer_range=0.2),  # fused attn_qkv (ruled like attn_v), position embeddings
}


def test_use_more_bits_layers_of_a_30_layer_model():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_rules_on_the_default_model_shape():
    """576-wide rows: k-quants fall back; tied embeddings take the output's Q8_0; attn_v/ffn_down get more bits."""
    names = [("token_embd.weight", (49152, 576))]
    for i in range(30):
        names += [(f"blk.{i}.attn_norm.weight", (576,)), (f"blk.{i}.attn_v.weight", (192, 576)),
                  (f"blk.{i}.ffn_down.weight", (576, 1536)), (f"blk.{i}.ffn_up.weight", (1536, 576))]
    shape = ModelShape("llama", 30, 9, 3)
    t = tensor_types(names, get_preset("Q4_K_M"), shape)
    assert t["token_embd.weight"] == QT.Q8_0 and t["blk.0.attn_norm.weight"] is None
    assert t["blk.0.attn_v.weight"] == QT.Q8_0  # Q6_K on more-bits layers, 576 % 256 != 0 -> Q8_0
    assert t["blk.3.attn_v.weight"] == QT.Q5_0  # Q4_K -> Q5_0
    assert t["blk.0.ffn_down.weight"] == QT.Q6_K and t["blk.3.ffn_down.weight"] == QT.Q4_K  # 1536-wide rows
    t = tensor_types(names, get_preset("Q2_K"), shape)
    assert t["blk.7.attn_v.weight"] == QT.Q4_0 and t["blk.7.ffn_down.weight"] == QT.Q3_K  # GQA 3: Q3_K
    t = tensor_types(names, get_preset("Q4_0"), shape, has_imatrix=True)
    assert t["blk.2.ffn_down.weight"] == QT.Q4_1 and t["blk.3.ffn_down.weight"] == QT.Q4_0


def test_fallbacks_are_recorded_and_explained():
    """Q4_K_M on 576-wide rows: the tensors whose K type fell back are listed, and the note says why the file
    has more bits per weight than the preset's name suggests (issue 30: "6.165 bits/w" without a word)."""
    from llmcourse.quant.gguf.load import SourceTensor

    names = [("token_embd.weight", (4096, 576))]
    for i in range(8):
        names += [(f"blk.{i}.attn_v.weight", (192, 576)), (f"blk.{i}.ffn_down.weight", (576, 1536))]
    fb: dict = {}
    tensor_types(names, get_preset("Q4_K_M"), ModelShape("llama", 8, 9, 3), fallbacks=fb)
    assert fb["token_embd.weight"] == (QT.Q6_K, QT.Q8_0) and fb["blk.2.attn_v.weight"] == (QT.Q4_K, QT.Q5_0)
    assert not any("ffn_down" in n for n in fb)  # 1536 = 6 x 256: no fallback
    src = [SourceTensor(n, s, QT.F32, lambda: None) for n, s in names]
    kvs = [KV("general.architecture", "llama", VT.STRING), KV("llama.block_count", 8, VT.UINT32)]
    info = quantized_file(kvs, src, get_preset("Q4_K_M"))[2]
    assert info["fallbacks"]["tensors"] == 9 and info["fallbacks"]["row_widths"] == [576]
    assert info["fallbacks"]["bits_per_weight_without"] < info["bits_per_weight"]
    note = fallback_note(info)
    assert "rows of 576 inputs" in note and "256-wide super-blocks" in note and "Q4_K -> Q5_0 x4" in note
    assert fallback_note(quantized_file(kvs, src, get_preset("Q8_0"))[2]) == ""


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory):
    tok = byte_tokenizer()
    out = {}
    for arch, cfg in TINY.items():
        path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}-f32.gguf"
        convert(tiny_model(arch, **cfg), tok, path, "f32", name=f"tiny-{arch}", pre_tokenizer="gpt-2")
        out[arch] = path
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_preset_file_equals_llama_model_quantize(f32_files, tmp_path, arch):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    src = f32_files[arch]
    mismatched = []
    for name in ALL:
        p = get_preset(name)
        ref, ours = tmp_path / f"ref-{name}.gguf", tmp_path / f"ours-{name}.gguf"
        llama_quantize(src, ref, int(p.ftype), pure=p.pure)
        quantize_gguf(src, ours, p)
        assert tensor_table(ours) == tensor_table(ref), name  # same names, order, types, shapes
        if ours.read_bytes() != ref.read_bytes():
            mismatched.append(name)
    assert not mismatched, f"tensor bytes differ from llama.cpp for {mismatched}"


def test_imatrix_files_equal_llama_model_quantize(f32_files, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    src = f32_files["llama"]
    rng = np.random.default_rng(0)
    _, infos = read_gguf_header(src)
    imatrix = {t.name: rng.gamma(0.5, 1.0, t.shape[-1]).astype(np.float32)
               for t in infos if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    for name in ["Q4_0", "Q4_K_M", "Q6_K"]:
        p = get_preset(name)
        ref, ours = tmp_path / f"ref-{name}.gguf", tmp_path / f"ours-{name}.gguf"
        llama_quantize(src, ref, int(p.ftype), imatrix=imatrix)
        quantize_gguf(src, ours, p, imatrix=imatrix)
        assert tensor_table(ours) == tensor_table(ref), name
        assert ours.read_bytes() == ref.read_bytes(), name
    # with an importance matrix, Q4_0 gives the first eighth of ffn_down the offset type Q4_1
    assert dict((n, t) for n, t, _ in tensor_table(tmp_path / "ours-Q4_0.gguf"))["blk.0.ffn_down.weight"] == "Q4_1"


def test_llama_cpp_runs_and_core_reads_our_files(f32_files, tmp_path, monkeypatch):
    """llama.cpp runs the files; transformers' GGUF reader (core) de-quantizes every tensor to our values."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    monkeypatch.setenv("LLMCOURSE_GGUF_BLOCKS", "0")  # every tensor de-quantized, to compare them all
    from llmcourse.core.models import load_model
    from llmcourse.quant.gguf.load import read_gguf, to_float32
    from llmcourse.quant.gguf.names import gguf_tensor_name, permute_rope

    tok = byte_tokenizer()
    ids = tok("the cat sat in the hat").input_ids
    ref = llama_logits(f32_files["llama"], ids)
    cfg = TINY["llama"]
    for name in ["Q8_0", "Q4_K_M", "Q2_K"]:
        path = tmp_path / f"m-{name}.gguf"
        quantize_gguf(f32_files["llama"], path, name)
        got = llama_logits(path, ids)  # llama.cpp also rounds the activations to 8 bits in these matmuls
        assert got.shape == ref.shape and np.isfinite(got).all(), name
        if name == "Q8_0":  # near-lossless; the lower types of a random model only need to run
            assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95
        ours = {t.name: to_float32(t) for t in read_gguf(path)[1]}
        sd = load_model(str(path)).model.state_dict()
        for hf_name, w in sd.items():
            g = gguf_tensor_name(hf_name)
            if g is None or g not in ours:
                continue
            if ".attn_q." in g or ".attn_k." in g:
                n = cfg["num_attention_heads"] if ".attn_q." in g else cfg["num_key_value_heads"]
                w = permute_rope(w, n)
            np.testing.assert_array_equal(w.reshape(ours[g].shape).numpy(), ours[g], err_msg=f"{name} {g}")


def test_requantizing_a_quantized_file(f32_files, tmp_path):
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(f32_files["qwen2"], q8, "Q8_0")
    info = quantize_gguf(q8, tmp_path / "q4.gguf", "Q4_0")
    assert info["requantized_from"] == ["Q8_0"]
    types = {n: t for n, t, _ in tensor_table(tmp_path / "q4.gguf")}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q6_K"


def test_bits_per_weight_and_metadata(f32_files, tmp_path):
    info = quantize_gguf(f32_files["llama"], tmp_path / "q.gguf", "Q8_0")
    assert info["types"] == {"F32": 17, "Q8_0": 57}
    assert 8.5 <= info["bits_per_weight"] < 8.6  # 34 bytes per 32 weights, plus the F32 norms
    kvs = read_gguf_header(tmp_path / "q.gguf")[0]
    assert [kv.key for kv in kvs][-2:] == ["general.quantization_version", "general.file_type"]
    assert kvs[-1].value == 7


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcourse", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_cli_quantize_gguf(f32_files, tmp_path):
    out = tmp_path / "out"
    r = _cli("quantize", "gguf", "--model", str(f32_files["llama"]), "--type", "Q4_K_M,q8_0", "--out", str(out),
             "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [f["preset"] for f in data["files"]] == ["Q4_K_M", "Q8_0"]
    assert sorted(p.name for p in out.glob("*.gguf")) == ["tiny-llama-Q4_K_M.gguf", "tiny-llama-Q8_0.gguf"]
    # unknown type, and --push-to-hub offline: one-line errors, nothing written
    r = _cli("quantize", "gguf", "--model", str(f32_files["llama"]), "--type", "Q7_Z", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown GGUF type" in r.stderr
    r = _cli("quantize", "gguf", "--model", str(f32_files["llama"]), "--type", "Q8_0", "--out", str(tmp_path / "y"),
             "--push-to-hub", "me/tiny-gguf")
    assert r.returncode == 2 and "push" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_default_model_presets_equal_llama_model_quantize(default_lm, tmp_path):
    """The default model (576-wide rows: fallbacks everywhere), from the same F32 GGUF as llama.cpp."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    src = tmp_path / "f32.gguf"
    convert(default_lm.model, default_lm.tokenizer, src, "f32", folder=default_lm.path)
    for name in ["Q4_K_M", "Q3_K_M", "Q8_0"]:
        p = get_preset(name)
        ref, ours = tmp_path / f"ref-{name}.gguf", tmp_path / f"ours-{name}.gguf"
        llama_quantize(src, ref, int(p.ftype))
        quantize_gguf(src, ours, p)
        assert tensor_table(ours) == tensor_table(ref), name
        assert ours.read_bytes() == ref.read_bytes(), name
        ref.unlink()
