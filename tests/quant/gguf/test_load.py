"""The fast GGUF loader (``quant.gguf.load.load_model``, registered for b"GGUF" files): same model, same
logits as transformers' GGUF path, and a one-line error (never random weights) for a file that lies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf_helpers import byte_tokenizer

from llmcourse.core import models as core_models
from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, Tensor, read_gguf_header, save_gguf
from llmcourse.quant.gguf.convert import convert_to_gguf as convert
from llmcourse.quant.gguf.load import load_model
from llmcourse.quant.gguf.presets import quantize_gguf

TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
TINY_GPT2 = dict(vocab_size=264, n_embd=256, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
TEXT = "the hat in the cat <|im_end|>"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    tok = byte_tokenizer()
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        model = tiny_model(arch, **(TINY_GPT2 if arch == "gpt2" else TINY))
        convert(model, tok, d / f"{arch}-f32.gguf", "f32", name=f"tiny-{arch}", pre_tokenizer="gpt-2")
        out[arch] = d / f"{arch}-f32.gguf"
    for preset in ("Q8_0", "Q4_K_M"):
        quantize_gguf(out["llama"], d / f"llama-{preset}.gguf", preset)
        out[f"llama-{preset}"] = d / f"llama-{preset}.gguf"
    return out


def _logits(model, tok, text=TEXT):
    ids = torch.tensor([tok(text).input_ids])
    with torch.inference_mode():
        return ids, model(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-Q8_0", "llama-Q4_K_M"])
def test_same_model_and_logits_as_transformers(files, name):
    path = files[name]
    lm = load_model(path, blocks=False)  # the float model of the file (blocks executed as stored: test_block_models)
    ref_model, ref_tok = core_models._load_gguf(Path(path), torch.float32)  # transformers' GGUF reader
    assert lm.kind == "gguf" and type(lm.model) is type(ref_model)
    assert lm.model.config.to_diff_dict() == ref_model.config.to_diff_dict()
    ids, got = _logits(lm.model, lm.tokenizer)
    ref_ids, want = _logits(ref_model, ref_tok)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert lm.tokenizer.special_tokens_map == ref_tok.special_tokens_map


def test_core_load_model_uses_the_fast_loader(files):
    import llmcourse.labs  # noqa: F401  (registers the labs' file formats)

    lm = core_models.load_model(str(files["llama"]))
    assert lm.kind == "gguf" and lm.info["load_seconds"] < 30


def test_bf16(files):
    lm = load_model(files["llama"], dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def _rewrite(src: Path, dst: Path, kv_edit=None, drop: str | None = None) -> Path:
    """Copy a GGUF with some metadata changed or a tensor dropped (data re-read from the source)."""
    import numpy as np

    kvs, infos = read_gguf_header(src)
    data = src.read_bytes()
    if kv_edit:
        kvs = kv_edit(kvs)
    tensors = [Tensor(t.name, t.shape, t.qtype,
                      lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset))
               for t in infos if t.name != drop]
    save_gguf(dst, kvs, tensors)
    return dst


def _set(key, value, vtype=VT.UINT32):
    def edit(kvs):
        kvs = [kv for kv in kvs if kv.key != key]
        return [*kvs, KV(key, value, vtype)]
    return edit


@pytest.mark.parametrize("case", ["missing", "blocks_more", "blocks_fewer", "arch", "extra"])
def test_broken_files_are_refused_not_loaded_at_random(files, tmp_path, case):
    src = files["llama"]
    dst = tmp_path / "bad.gguf"
    if case == "missing":
        _rewrite(src, dst, drop="blk.1.ffn_up.weight")
    elif case == "blocks_more":
        _rewrite(src, dst, _set("llama.block_count", 3))
    elif case == "blocks_fewer":
        _rewrite(src, dst, _set("llama.block_count", 1))
    elif case == "arch":
        def edit(kvs):
            out = [KV(kv.key.replace("llama.", "falcon."), kv.value, kv.vtype, kv.sub_type) for kv in kvs]
            return [KV("general.architecture", "falcon", VT.STRING) if kv.key == "general.architecture" else kv
                    for kv in out]
        _rewrite(src, dst, edit)
    else:
        import numpy as np

        kvs, infos = read_gguf_header(src)
        data = src.read_bytes()
        tensors = [Tensor(t.name, t.shape, t.qtype, lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset))
                   for t in infos]
        tensors.append(Tensor("blk.0.extra.weight", (4,), QT.F32, lambda: np.zeros(4, np.float32)))
        save_gguf(dst, kvs, tensors)
    with pytest.raises(UserError) as e:
        load_model(dst)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_default_model_q8_0_equals_transformers_and_loads_fast(default_lm, tmp_path):
    import time

    from llmcourse.quant.gguf.convert import from_hf

    f32 = tmp_path / "f32.gguf"
    convert(default_lm.model, default_lm.tokenizer, f32, "f32", folder=default_lm.path)
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(from_hf(default_lm.model, default_lm.tokenizer, "f32", folder=default_lm.path), q8, "Q8_0")
    load_model(q8, blocks=False)  # warm the imports
    t0 = time.perf_counter()
    lm = load_model(q8, blocks=False)
    seconds = time.perf_counter() - t0
    ref_model, ref_tok = core_models._load_gguf(q8, torch.float32)
    _, got = _logits(lm.model, lm.tokenizer, "The capital of France is")
    _, want = _logits(ref_model, ref_tok, "The capital of France is")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert seconds < 10  # < 2 s on a quiet machine (see docs/gguf.md)
