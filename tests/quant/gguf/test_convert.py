"""HF -> GGUF conversion: the file llama.cpp reads, its metadata, and llama.cpp's output on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from gguf_helpers import (
    byte_tokenizer,
    default_tokenizer,
    hf_greedy,
    llama_greedy,
    llama_logits,
    tensor_table,
)

from llmcourse.core.gguf_container import read_gguf_header
from llmcourse.quant.gguf.convert import convert_to_gguf as convert
from llmcourse.quant.gguf.convert import from_hf
from llmcourse.quant.gguf.names import permute_rope, unpermute_rope

TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
TINY_GPT2 = dict(vocab_size=264, n_embd=256, n_layer=4, n_head=4, bos_token_id=1, eos_token_id=2, initializer_range=0.2)

# llama.cpp's own converter, fetched by `make setup-test` from the llama-cpp-python sdist
LLAMA_CPP_CONVERT = Path(os.environ.get("LLAMA_CPP_CONVERT") or Path(
    os.environ.get("LLMCOURSE_HOME", Path.home() / ".cache" / "llmcourse")) / "llama.cpp-convert" / "convert_hf_to_gguf.py")


def kv_dict(path: Path) -> dict:
    return {kv.key: kv.value for kv in read_gguf_header(path)[0]}


# --- the q/k permutation --------------------------------------------------------------------

def test_permute_rope_turns_rotate_half_into_adjacent_pairs():
    """HF's rope on q equals ggml's pairwise rope on the permuted q, permuted back."""
    torch.manual_seed(0)
    n_head, d, pos = 3, 8, 5
    w = torch.randn(n_head * d, 4)
    theta = pos * 10000.0 ** (-torch.arange(0, d, 2).float() / d)  # (d/2,)
    cos, sin = torch.cos(theta), torch.sin(theta)
    q = w[:, 0].reshape(n_head, d)
    # Hugging Face: rotate (x_j, x_{j+d/2})
    x, y = q[:, : d // 2], q[:, d // 2:]
    hf = torch.cat([x * cos - y * sin, x * sin + y * cos], -1)
    # ggml normal rope: rotate adjacent pairs (x_2j, x_2j+1) of the permuted rows
    qp = permute_rope(w, n_head)[:, 0].reshape(n_head, d // 2, 2)
    a, b = qp[..., 0], qp[..., 1]
    gg = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(n_head * d, 1)
    assert torch.allclose(unpermute_rope(gg, n_head).reshape(n_head, d), hf, atol=1e-6)
    assert torch.equal(unpermute_rope(permute_rope(w, n_head), n_head), w)


# --- tiny models: llama.cpp reads our file and computes what transformers computes ---------------

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    tok = byte_tokenizer()
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        model = tiny_model(arch, **(TINY_GPT2 if arch == "gpt2" else TINY))
        path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}-f32.gguf"
        convert(model, tok, path, "f32", name=f"tiny-{arch}", pre_tokenizer="gpt-2")
        out[arch] = (model, path)
    return tok, out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_llama_cpp_logits_and_greedy_equal_transformers(tiny_files, arch):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    tok, files = tiny_files
    model, path = files[arch]
    ids = tok("the cat sat in the hat, then the dog").input_ids
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(path, ids)
    # fp32 on both sides; differences are summation order (|logit| ~ 10), and for GPT-2 ggml's GELU,
    # which reads an fp16 table
    np.testing.assert_allclose(got, ref, atol=2e-2 if arch == "gpt2" else 2e-3, rtol=0)
    assert llama_greedy(path, ids, 24, tok.eos_token_id) == hf_greedy(model, ids, 24, tok.eos_token_id)


def test_tiny_metadata_and_tensor_layout(tiny_files):
    tok, files = tiny_files
    model, path = files["llama"]
    kv = kv_dict(path)
    c = model.config
    assert kv["general.architecture"] == "llama"
    assert kv["llama.block_count"] == c.num_hidden_layers
    assert kv["llama.embedding_length"] == c.hidden_size
    assert kv["llama.attention.head_count_kv"] == c.num_key_value_heads
    assert kv["llama.rope.dimension_count"] == c.hidden_size // c.num_attention_heads
    assert abs(kv["llama.attention.layer_norm_rms_epsilon"] - c.rms_norm_eps) < 1e-9
    assert kv["general.file_type"] == 0 and kv["general.quantization_version"] == 2
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == c.vocab_size == len(types)
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]  # CONTROL
    assert tokens[-1] == f"[PAD{c.vocab_size - 1}]" and types[-1] == 5  # a row without a token: UNUSED
    assert kv["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġ a", "i n"]
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2
    assert kv["tokenizer.chat_template"] == tok.chat_template
    # tied embeddings: no output.weight; norms F32; ggml shapes are (n_per_row, rows)
    table = {n: (t, s) for n, t, s in tensor_table(path)}
    assert "output.weight" not in table
    assert table["blk.0.attn_k.weight"] == ("F32", (c.hidden_size, c.num_key_value_heads * 64))
    assert table["blk.0.ffn_down.weight"] == ("F32", (c.intermediate_size, c.hidden_size))
    assert "output.weight" in {n for n, _, _ in tensor_table(files["qwen2"][1])}  # qwen2 tiny: untied
    # GPT-2: Conv1D weights transposed to (out, in) rows, fused qkv, position embeddings kept F32
    g = {n: (t, s) for n, t, s in tensor_table(files["gpt2"][1])}
    assert g["blk.0.attn_qkv.weight"] == ("F32", (256, 768)) and g["blk.0.ffn_down.weight"] == ("F32", (1024, 256))
    assert kv_dict(files["gpt2"][1])["gpt2.feed_forward_length"] == 1024


@pytest.mark.parametrize("outtype,qtype", [("f16", "F16"), ("bf16", "BF16")])
def test_half_types_round_like_torch_and_keep_norms_f32(tmp_path, outtype, qtype):
    model = tiny_model("qwen2", **TINY)
    path = tmp_path / "m.gguf"
    convert(model, byte_tokenizer(), path, outtype, pre_tokenizer="gpt-2")
    table = {n: t for n, t, _ in tensor_table(path)}
    assert table["blk.0.attn_norm.weight"] == "F32" and table["blk.0.attn_q.bias"] == "F32"
    assert table["blk.0.attn_q.weight"] == qtype and table["token_embd.weight"] == qtype
    import gguf

    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    w = model.model.layers[1].mlp.up_proj.weight.detach()
    want = w.to(torch.float16 if outtype == "f16" else torch.bfloat16)
    raw = np.array(t.data).reshape(-1)
    raw = raw.view(np.int16) if outtype == "bf16" else raw  # gguf-py hands BF16 over as bytes
    got = torch.from_numpy(raw).reshape(w.shape)
    got = got.view(torch.bfloat16) if outtype == "bf16" else got
    assert torch.equal(got.float(), want.float())
    assert kv_dict(path)["general.file_type"] == {"f16": 1, "bf16": 32}[outtype]


def test_reads_back_through_core_loader(tiny_files):
    """transformers' GGUF reader (core.load_model) un-permutes q/k: same logits as the original."""
    from llmcourse.core.models import load_model

    tok, files = tiny_files
    model, path = files["llama"]
    lm = load_model(str(path))
    ids = torch.tensor([tok("the hat in the cat").input_ids])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_real_tokenizer_metadata_matches_llama_cpp_tokenization(tmp_path):
    """SmolLM2's tokenizer on a tiny llama: pre-tokenizer recognised, llama.cpp tokenizes as HF does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    tok = default_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       bos_token_id=1, eos_token_id=2)
    path = tmp_path / "tiny-smol.gguf"
    convert(model, tok, path, "f16")
    kv = kv_dict(path)
    assert kv["tokenizer.ggml.pre"] == "smollm"
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert len(kv["tokenizer.ggml.merges"]) == 48900
    assert kv["tokenizer.chat_template"] == tok.chat_template
    from gguf_helpers import quiet_stderr

    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    text = "Hello world! The quick brown fox, naïve café; <|im_start|>user"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids
    ids = tok("A short sentence about Paris.").input_ids
    assert llm.detokenize(ids).decode() == tok.decode(ids)


def test_unsupported_architecture_is_a_user_error():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from llmcourse.core.errors import UserError

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=264, hidden_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=128))
    with pytest.raises(UserError, match="cannot be converted"):
        from_hf(model, byte_tokenizer())


# --- the CLI ------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcourse", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_cli_convert_gguf(tmp_path):
    model = tiny_model("qwen2", **TINY)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "m.gguf"
    r = _cli("convert", "gguf", "--model", str(folder), "--outtype", "f16", "--tokenizer-pre", "gpt-2",
             "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["outtype"] == "f16" and data["architecture"] == "qwen2" and out.stat().st_size == data["bytes"]
    assert kv_dict(out)["general.name"] == "Hf"  # gguf.Metadata title-cases a folder name
    # refuses to overwrite its input, and says what to do
    r = _cli("convert", "gguf", "--model", str(out), "--out", str(out))
    assert r.returncode == 2 and "overwrite" in r.stderr and r.stderr.count("\n") == 1
    r = _cli("convert", "gguf", "--model", str(folder), "--outtype", "q4", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2


# --- the default model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_f32_greedy_equals_llama_cpp(default_lm, tmp_path):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    path = tmp_path / "smollm2-f32.gguf"
    info = convert(default_lm.model, default_lm.tokenizer, path, "f32", folder=default_lm.path)
    assert info["tensors"] == 272 and info["parameters"] == 134_515_008
    tok = default_lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    ours = hf_greedy(default_lm.model, ids, 40, tok.eos_token_id)
    assert llama_greedy(path, ids, 40, tok.eos_token_id) == ours
    kv = kv_dict(path)
    assert kv["general.name"] == "SmolLM2 135M Instruct" and kv["general.size_label"] == "135M"
    assert kv["tokenizer.ggml.pre"] == "smollm" and kv["tokenizer.ggml.padding_token_id"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP_CONVERT.exists(),
                    reason=f"llama.cpp's converter is not at {LLAMA_CPP_CONVERT}: `make setup-test` fetches it "
                    "(or set LLAMA_CPP_CONVERT=.../convert_hf_to_gguf.py)")
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_default_model_file_is_byte_identical_to_convert_hf_to_gguf(default_lm, tmp_path, outtype):
    """With llama.cpp's own converter at hand (the llama-cpp-python sdist's vendor/llama.cpp), same bytes."""
    script = LLAMA_CPP_CONVERT
    ref = tmp_path / "ref.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent / "gguf-py"),
                                                        os.environ.get("LLAMA_CPP_STUBS", "")])}
    subprocess.run([sys.executable, str(script), str(default_lm.path), "--outtype", outtype, "--outfile", str(ref)],
                   check=True, capture_output=True, env=env, timeout=600)
    ours = tmp_path / "ours.gguf"
    convert(default_lm.model, default_lm.tokenizer, ours, outtype, folder=default_lm.path)
    assert ours.read_bytes() == ref.read_bytes()
