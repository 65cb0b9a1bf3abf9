"""`convert gguf` and the GGUF loader on the architectures people bring: Llama 3, Mistral, Qwen3, Gemma 3,
Phi-3 and SmolLM3 (tiny random transformers configs, SmolLM2's real byte-level BPE tokenizer).

For each: our F32 file is byte-identical to llama.cpp's own ``convert_hf_to_gguf.py`` on the same folder;
llama.cpp computes on it what transformers computes (logits, greedy tokens); our loader reads it back into
the same Hugging Face model (same logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_helpers import default_tokenizer, hf_greedy, llama_logits

from llmcourse.core.gguf_container import read_gguf_header
from llmcourse.quant.gguf.convert import convert_to_gguf

# llama.cpp's own converter, fetched by `make setup-test` from the llama-cpp-python sdist
LLAMA_CPP_CONVERT = Path(os.environ.get("LLAMA_CPP_CONVERT") or Path(
    os.environ.get("LLMCOURSE_HOME", Path.home() / ".cache" / "llmcourse")) / "llama.cpp-convert" / "convert_hf_to_gguf.py")

# SmolLM2's tokenizer (49152 tokens) is one the reference converter recognises (pre-tokenizer "smollm")
BASE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
# name -> (model_type, config): each exercises what its architecture adds
ARCHS = {
    # Llama 3.1 RoPE scaling -> rope_freqs.weight (wavelengths 32..1024 in the smooth band: 5 frequencies)
    "llama3": ("llama", dict(BASE, head_dim=32, tie_word_embeddings=True, max_position_embeddings=2048,
                             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=32.0, original_max_position_embeddings=1024))),
    "mistral": ("mistral", dict(BASE, head_dim=16, tie_word_embeddings=False)),  # head_dim != hidden / heads
    "qwen3": ("qwen3", dict(BASE, head_dim=32, tie_word_embeddings=True)),  # q/k norms
    # norms stored w + 1, embedding scale, 5 sliding-window layers : 1 global, two RoPE bases
    "gemma3": ("gemma3_text", dict(BASE, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                   tie_word_embeddings=True)),
    "phi3": ("phi3", dict(BASE, tie_word_embeddings=False, pad_token_id=0)),  # fused qkv and gate-up
    "smollm3": ("smollm3", dict(BASE, num_hidden_layers=4, tie_word_embeddings=True, pad_token_id=2)),  # NoPE layer 3
}
GGUF_ARCH = {"llama3": "llama", "mistral": "llama", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3",
             "smollm3": "smollm3"}


def _kv(path: Path) -> dict:
    return {kv.key: kv.value for kv in read_gguf_header(path)[0]}


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    """name -> (model, tokenizer, HF folder, our F32 GGUF)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = default_tokenizer()
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for name, (model_type, kw) in ARCHS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32).eval()
        # not named after the architecture: llama.cpp gives a model whose general.name holds "phi3" the
        # attributes of Phi-3's SentencePiece tokens (</s>, <unk>, <s>), which SmolLM2's vocabulary lacks
        folder = root / f"tiny-{len(out)}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        if model_type == "phi3":  # Phi-4's byte-level BPE (the reference reads tokenizer_config's class)
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
        path = root / f"{name}.gguf"
        convert_to_gguf(model, tok, path, "f32", folder=folder)
        out[name] = (model, tok, folder, path)
    return out


@pytest.mark.skipif(not LLAMA_CPP_CONVERT.exists(),
                    reason=f"llama.cpp's converter is not at {LLAMA_CPP_CONVERT}: `make setup-test` fetches it "
                    "(or set LLAMA_CPP_CONVERT=.../convert_hf_to_gguf.py)")
def test_f32_files_are_byte_identical_to_convert_hf_to_gguf(archs, tmp_path):
    """One run of the reference converter over the six folders (its import costs more than a conversion)."""
    stubs = tmp_path / "stubs" / "sentencepiece"  # the converter imports it before looking for tokenizer.model
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("class SentencePieceProcessor:\n    pass\n")
    driver = tmp_path / "run_reference.py"
    driver.write_text("import runpy, sys\nscript, jobs = sys.argv[1], sys.argv[2:]\n"
                      "main = runpy.run_path(script, run_name='reference')['main']\n"
                      "for i in range(0, len(jobs), 2):\n"
                      "    sys.argv = [script, jobs[i], '--outtype', 'f32', '--outfile', jobs[i + 1]]\n"
                      "    main()\n")
    jobs = [str(x) for name, (_, _, folder, _) in archs.items() for x in (folder, tmp_path / f"{name}-ref.gguf")]
    have_sp = subprocess.run([sys.executable, "-c", "import sentencepiece"], capture_output=True).returncode == 0
    path = [str(LLAMA_CPP_CONVERT.parent / "gguf-py"), str(LLAMA_CPP_CONVERT.parent)] + ([] if have_sp else [str(stubs.parent)])
    r = subprocess.run([sys.executable, str(driver), str(LLAMA_CPP_CONVERT), *jobs], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(path)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, (_, _, _, ours) in archs.items():
        assert ours.read_bytes() == (tmp_path / f"{name}-ref.gguf").read_bytes(), name


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (type, torch-order shape, F32 data) of a GGUF, read with our header parser."""
    out = {}
    for t in read_gguf_header(path)[1]:
        data = np.fromfile(path, dtype=np.float32, count=t.nbytes // 4, offset=t.offset) if t.qtype.name == "F32" else None
        out[t.name] = (t.qtype.name, t.shape, data)
    return out


def test_metadata_and_layouts(archs):
    """What each architecture adds, in the file: names, shapes, the keys llama.cpp reads."""
    for name, (_, _, _, path) in archs.items():
        assert _kv(path)["general.architecture"] == GGUF_ARCH[name], name
    phi3 = _tensors(archs["phi3"][3])  # q (4 heads x 16) + k, v (2 heads x 16 each); gate and up stacked
    assert phi3["blk.0.attn_qkv.weight"][:2] == ("F32", (64 + 2 * 32, 64))
    assert phi3["blk.0.ffn_up.weight"][:2] == ("F32", (2 * 128, 64)) and "blk.0.ffn_gate.weight" not in phi3
    assert _kv(archs["phi3"][3])["phi3.attention.sliding_window"] == 0
    qwen3 = _tensors(archs["qwen3"][3])
    assert qwen3["blk.0.attn_q_norm.weight"][1] == (32,) and qwen3["blk.0.attn_k_norm.weight"][1] == (32,)
    kv = _kv(archs["gemma3"][3])
    assert kv["gemma3.attention.sliding_window"] == 8 and kv["gemma3.rope.freq_base_swa"] == 10000.0
    assert kv["gemma3.rope.freq_base"] == 1_000_000.0 and kv["gemma3.attention.key_length"] == 32
    gemma = _tensors(archs["gemma3"][3])
    hf = archs["gemma3"][0].model.layers[1].post_feedforward_layernorm.weight.detach().numpy()
    assert np.array_equal(gemma["blk.1.post_ffw_norm.weight"][2], hf + np.float32(1))  # llama.cpp scales by w + 1
    assert "output.weight" not in gemma and "blk.1.post_attention_norm.weight" in gemma
    freqs = _tensors(archs["llama3"][3])["rope_freqs.weight"][2]
    assert freqs.shape == (16,) and freqs[0] == 1 and freqs[-1] == 8 and ((freqs > 1) & (freqs < 8)).sum() >= 2


@pytest.mark.parametrize("name", list(ARCHS))
def test_llama_cpp_computes_what_transformers_computes(archs, name):
    """Logits on the prompt and transformers' 16 greedy tokens, and llama.cpp's choice at each step (its
    argmax after the same prefix: equal at every step means the same greedy continuation), in one eval."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    model, tok, _, path = archs[name]
    ids = tok("The quick brown fox jumps over the lazy dog, then the cat sat on the mat.").input_ids  # > 8: SWA
    ours = hf_greedy(model, ids, 16, None)
    full = ids + ours
    with torch.inference_mode():
        ref = model(torch.tensor([full])).logits[0].numpy()
    got = llama_logits(path, full)
    # fp32 on both sides (F32 weights and KV cache): summation order only (|logit| <= ~3 here), and for
    # Gemma's GELU the fp16 table ggml reads it from (as for GPT-2 in test_convert.py)
    np.testing.assert_allclose(got, ref, atol=1e-2 if name == "gemma3" else 2e-3, rtol=0)
    assert got[len(ids) - 1:-1].argmax(-1).tolist() == ours


@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_convert_then_load(archs, name):
    """load_model(our .gguf) rebuilds the same model: Gemma's norms w' - 1, Llama 3's RoPE scaling from
    rope_freqs, Phi-3's rotary fraction... the logits are the original's."""
    from llmcourse.core.models import load_model

    model, tok, _, path = archs[name]
    lm = load_model(str(path))
    # llama.cpp stores Mistral as llama (no sliding window; none in this config): it reads back as Llama
    assert type(lm.model).__name__ == ("LlamaForCausalLM" if name == "mistral" else type(model).__name__)
    ids = torch.tensor([tok("Round trips keep every weight where it was.").input_ids])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("low,high,ctx", [(1.0, 4.0, 8192), (1.0, 4.0, 64), (1.0, 1.5, 300), (2.0, 64.0, 4096)])
def test_llama3_rope_parameters_recovered_from_divisors(low, high, ctx):
    """However many frequencies fall in the smooth band (many, one, none), the recovered parameters give
    transformers' Llama 3 inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmcourse.quant.gguf.convert import llama3_rope_factors
    from llmcourse.quant.gguf.load import llama3_rope_parameters

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=ctx)
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2 * ctx, rope_parameters=rope)
    divisors = llama3_rope_factors(cfg).numpy()
    got = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2 * ctx,
                      rope_parameters=llama3_rope_parameters(divisors, 500000.0, 64, original_ctx=ctx))
    want_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](got, "cpu")
    torch.testing.assert_close(got_inv, want_inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope", [dict(rope_type="linear", factor=2.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)])
def test_rope_scaling_round_trip(tmp_path, rope):
    """Linear and YaRN RoPE scaling written as rope.scaling.* keys and read back: the same logits."""
    from gguf_helpers import byte_tokenizer
    from transformers import AutoModelForCausalLM, Qwen3Config

    from llmcourse.core.models import load_model

    cfg = Qwen3Config(**dict(BASE, vocab_size=300, head_dim=32, tie_word_embeddings=True),
                      rope_parameters=dict(rope, rope_theta=10000.0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = tmp_path / "m.gguf"
    convert_to_gguf(model, byte_tokenizer(), path, "f32", name="tiny", pre_tokenizer="gpt-2")
    assert _kv(path)["qwen3.rope.scaling.type"] == rope["rope_type"]
    ids = torch.arange(3, 203)[None]  # past the original context: the scaling matters
    with torch.inference_mode():
        torch.testing.assert_close(load_model(str(path)).model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_quantize_gguf_byte_identical_to_llama_quantize(archs, tmp_path):
    """`quantize gguf` (llama.cpp's per-tensor rules) on each architecture's file: llama_model_quantize's bytes.
    (Rows of 64 are no whole K-quant blocks: the preset's fallbacks are exercised, Q5_0/Q5_1/Q8_0.)"""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    from gguf import LlamaFileType
    from gguf_helpers import llama_quantize

    from llmcourse.quant.gguf.presets import quantize_gguf

    for name, (_, _, _, path) in archs.items():
        ours, ref = tmp_path / f"{name}-ours.gguf", tmp_path / f"{name}-ref.gguf"
        quantize_gguf(path, ours, "Q4_K_M")
        llama_quantize(path, ref, int(LlamaFileType.MOSTLY_Q4_K_M))
        assert ours.read_bytes() == ref.read_bytes(), name


def test_unsupported_architecture_fails_in_one_line(tmp_path):
    """A Mamba folder: `convert gguf` refuses it before loading, naming the supported model types."""
    from transformers import MambaConfig

    folder = tmp_path / "mamba"
    folder.mkdir()
    MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1).to_json_file(folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "llmcourse", "convert", "gguf", "--model", str(folder), "--out",
                        str(tmp_path / "m.gguf")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'mamba'" in r.stderr and "gemma3_text" in r.stderr and "qwen3" in r.stderr and "phi3" in r.stderr
    assert not (tmp_path / "m.gguf").exists()
