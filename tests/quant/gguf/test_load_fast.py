"""The fast loader's one-pass Q8_0 de-quantizer equals the ggml one, and the card reports the load
apart from the library's import time."""

from __future__ import annotations

import numpy as np
from conftest import tiny_model
from gguf import GGMLQuantizationType as QT
from gguf_helpers import byte_tokenizer

from llmcourse.core import models as core_models
from llmcourse.quant.gguf.convert import convert_to_gguf as convert
from llmcourse.quant.gguf.load import _q8_0_fp32, blocks_by_default
from llmcourse.quant.gguf.quantize import dequantize, quantize

TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def test_q8_0_one_pass_equals_the_ggml_dequantizer() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 96)) * rng.uniform(1e-3, 10, (6, 1))).astype(np.float32)
    w[2] = 0  # a zero block: d = 0
    raw = quantize(w, QT.Q8_0)
    got = _q8_0_fp32(np.ascontiguousarray(raw).reshape(-1))
    want = dequantize(raw, QT.Q8_0).reshape(-1, 32)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    noise = rng.integers(0, 256, 34 * 50, dtype=np.uint8)  # any bytes (scales not from a quantizer)
    noise.reshape(50, 34)[:, 1] &= 0x3B  # finite fp16 scales
    assert np.array_equal(_q8_0_fp32(noise), dequantize(noise.reshape(1, -1), QT.Q8_0).reshape(-1, 32))


def test_card_reports_import_apart_from_load(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    convert(tiny_model("llama", **TINY), byte_tokenizer(), path, "f32", name="tiny", pre_tokenizer="gpt-2")
    card = core_models.model_card(core_models.load_model(str(path)))
    assert card["kind"] == "gguf" and 0 <= card["import_seconds"] and 0 < card["load_seconds"] < 30


def test_blocks_switch_is_read_once(monkeypatch, caplog) -> None:
    monkeypatch.setenv("LLMCOURSE_GGUF_BLOCKS", "0")
    assert blocks_by_default() is False
    monkeypatch.setenv("LLMCOURSE_GGUF_BLOCKS", "1")
    assert blocks_by_default() is False  # read once per process
    blocks_by_default.cache_clear()
    monkeypatch.setenv("LLMCOURSE_GGUF_BLOCKS", "no")
    with caplog.at_level("WARNING"):
        assert blocks_by_default() is blocks_by_default() is True
    assert caplog.text.count("LLMCOURSE_GGUF_BLOCKS=no is not") == 1
