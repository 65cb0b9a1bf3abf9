"""8-bit lab: the notebook's formulas in closed form, the int8 modules, folders that reload, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_folder, tiny_model

from llmcourse.core.errors import UserError
from llmcourse.quant.int8 import (
    Int8Config,
    absmax_quantize,
    fake_quantize,
    linear_weight_bytes,
    load_quantized,
    model_bytes,
    quantize_model,
    save_quantized,
    zeropoint_quantize,
)
from llmcourse.quant.int8.linear import Int8Embedding, Int8Linear


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Most tests run the row-wise kernel eagerly (same maths; compiling costs seconds per shape);
    test_compiled_kernel_matches_eager covers the compiled one. They pin the weight-only product (fp32
    activations): the W8A8 block kernel, the default for decoding, is tested in test_int8_blocks.py."""
    monkeypatch.setenv("LLMCOURSE_INT8_COMPILE", "0")
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "rows")


# --- closed forms ------------------------------------------------------------------------------

def test_notebook_worked_example_zeropoint():
    qt = zeropoint_quantize(torch.tensor([3.2, -3.0, 0.1]))
    assert qt.scale.item() == pytest.approx(255 / 6.2) and round(qt.scale.item(), 2) == 41.13
    assert qt.zero.item() == -5
    assert qt.q.tolist() == [[127, -128, -1]]  # max -> 127, min -> -128, 0.1 -> -1
    back = qt.dequantize()[0]
    assert back[2].item() == pytest.approx((-1 + 5) / (255 / 6.2))


def test_absmax_closed_form():
    x = torch.tensor([[1.0, -0.5, 0.25, 2.0]])
    qt = absmax_quantize(x)
    assert qt.scale.item() == pytest.approx(127 / 2.0)
    # 63.5 rounds to 64 (ties to even), -31.75 -> -32, 15.875 -> 16
    assert qt.q.tolist() == [[64, -32, 16, 127]]
    assert torch.equal(qt.dequantize(), qt.q.float() / qt.scale)


@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("row", None), ("group", 16), ("group", 7)])
def test_round_trip_bound(method, granularity, group_size):
    torch.manual_seed(0)
    x = torch.randn(24, 50) * torch.logspace(-3, 1, 24).unsqueeze(1) + torch.rand(24, 1)  # rows of varied scale/offset
    quant = absmax_quantize if method == "absmax" else zeropoint_quantize
    qt = quant(x, granularity, group_size)
    assert qt.q.dtype == torch.int8 and qt.q.shape == x.shape
    from llmcourse.quant.int8 import expand_stat

    s = expand_stat(qt.scale, x.shape[1], group_size).expand_as(x)
    err = (x - qt.dequantize()).abs()
    assert (err <= 0.5 / s + 1e-6 * x.abs()).all(), (err * s).max()
    expected_stats = {"tensor": (1, 1), "row": (24, 1), "group": (24, -(-50 // (group_size or 1)))}[granularity]
    assert tuple(qt.scale.shape) == expected_stats
    # finer granularity is never worse on average
    if granularity != "tensor":
        coarse = quant(x, "tensor")
        assert err.mean() <= (x - coarse.dequantize()).abs().mean()


def test_guards_for_constant_and_zero_tensors():
    for c in [0.0, 0.5, -7.25, 1e-42]:
        x = torch.full((3, 8), c)
        for quant in (absmax_quantize, zeropoint_quantize):
            for g in ("tensor", "row"):
                qt = quant(x, g)
                assert torch.isfinite(qt.scale).all()
                back = qt.dequantize()
                assert torch.isfinite(back).all()
                assert (back - x).abs().max() <= 0.5 / qt.scale.min() + 1e-7
    assert absmax_quantize(torch.zeros(2, 4)).q.abs().sum() == 0


def test_fake_quantize_keeps_shape_and_dtype():
    x = torch.randn(4, 3, 5, dtype=torch.bfloat16)
    y = fake_quantize(x, "zeropoint", "row")
    assert y.shape == x.shape and y.dtype == x.dtype


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="granularity"):
        Int8Config(method="absmax", granularity="column")
    with pytest.raises(UserError, match="vector-wise"):
        Int8Config(method="llm.int8", granularity="group")
    with pytest.raises(UserError, match="group size"):
        Int8Config(method="absmax", granularity="group", group_size=0)
    with pytest.raises(UserError):
        Int8Config(method="int4")


# --- modules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,granularity", [("absmax", "row"), ("zeropoint", "row"), ("absmax", "tensor"),
                                                ("zeropoint", "group")])
def test_int8_linear_equals_dequantized_linear(method, granularity):
    torch.manual_seed(1)
    lin = torch.nn.Linear(40, 24)
    from llmcourse.quant.int8 import quantize_tensor

    qt = quantize_tensor(lin.weight, method, granularity, 16)
    mod = Int8Linear(qt, lin.bias.detach())
    w = qt.dequantize()
    for shape in [(1, 1, 40), (2, 5, 40), (1, 40), (40,)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = torch.nn.functional.linear(x, w, lin.bias)
            out = mod(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert mod.qweight.dtype == torch.int8


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("method", ["absmax", "zeropoint"])
def test_compiled_kernel_matches_eager(method, words, monkeypatch):
    """The one-row kernel, reading one-byte codes (AVX-512) or the same bytes as 4-byte words (other CPUs)."""
    from llmcourse.core.runtime import KernelOptions
    from llmcourse.quant.int8 import quantize_tensor

    monkeypatch.setenv("LLMCOURSE_BYTE_WORDS", "1" if words else "0")
    KernelOptions.detect.cache_clear()  # the runtime reads its overrides once per process

    torch.manual_seed(4)
    lin = torch.nn.Linear(96, 40, bias=False)
    mod = Int8Linear(quantize_tensor(lin.weight, method, "row"))
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        eager = mod(x)
        monkeypatch.setenv("LLMCOURSE_INT8_COMPILE", "1")
        KernelOptions.detect.cache_clear()
        compiled = mod(x)
        ref = torch.nn.functional.linear(x, mod.dequantize())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, ref, rtol=1e-5, atol=1e-5)


def test_int8_embedding_lookup_matches_dequantized_table():
    torch.manual_seed(2)
    from llmcourse.quant.int8 import quantize_tensor

    table = torch.randn(30, 12)
    for method, gran in [("absmax", "row"), ("zeropoint", "group"), ("absmax", "tensor")]:
        qt = quantize_tensor(table, method, gran, 5)
        emb = Int8Embedding(qt)
        ids = torch.tensor([[0, 29, 3], [3, 3, 7]])
        torch.testing.assert_close(emb(ids), qt.dequantize()[ids])


def _tokens(n=24, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_quantized_model_matches_fake_quantized_model(arch):
    """Real int8 storage computes what the notebook's de-quantized fp32 model computes."""
    model = tiny_model(arch)
    cfg = Int8Config("zeropoint", "row")
    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, cfg)
    fake = copy.deepcopy(model)
    with torch.no_grad():  # the notebook's way: every linear / embedding weight replaced by X'
        for name in report["modules"]:
            m = fake.get_submodule(name)
            w = m.weight if not type(m).__name__ == "Conv1D" else m.weight.t()
            deq = fake_quantize(w, "zeropoint", "row")
            m.weight.copy_(deq if not type(m).__name__ == "Conv1D" else deq.t())
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)
    assert all(isinstance(qmodel.get_submodule(n), Int8Linear | Int8Embedding) for n in report["modules"])
    if model.config.tie_word_embeddings:
        head, emb = qmodel.get_output_embeddings(), qmodel.get_input_embeddings()
        assert head.qweight is emb.qweight  # one int8 table for both


def test_memory_of_quantized_linear_weights():
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    before = linear_weight_bytes(model)["bytes"]
    for cfg in [Int8Config("absmax", "row"), Int8Config("llm.int8"), Int8Config("zeropoint", "row")]:
        q = copy.deepcopy(model)
        report = quantize_model(q, cfg)
        after = linear_weight_bytes(q)["bytes"]
        assert after / before <= 0.27, (cfg.name, after / before)
        assert report["int8_bytes"] / report["fp32_bytes"] <= 0.27
        assert model_bytes(q) < 0.4 * model_bytes(model)


def test_model_card_counts_int8_weights_as_parameters():
    from llmcourse.core.models import LoadedModel

    model = tiny_model("llama")
    before = LoadedModel(model, None, "tiny").n_params
    q = copy.deepcopy(model)
    quantize_model(q, Int8Config(method="absmax", granularity="row"))
    assert not any(isinstance(p, torch.Tensor) and p.dtype == torch.int8 for p in q.parameters())
    assert LoadedModel(q, None, "tiny-int8").n_params == before  # tied embedding/head counted once


def test_skip_keeps_modules_in_full_precision():
    model = tiny_model("qwen2")
    report = quantize_model(model, Int8Config("absmax", "row", skip=["lm_head", "q_proj"]))
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.k_proj, Int8Linear)
    assert "lm_head" not in report["modules"]


# --- folders -----------------------------------------------------------------------------------

class _NoTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("arch,cfg", [
    ("llama", Int8Config("absmax", "row")),
    ("qwen2", Int8Config("zeropoint", "group", group_size=24)),
    ("gpt2", Int8Config("llm.int8", threshold=2.0)),
    ("llama", Int8Config("absmax", "tensor", skip=["lm_head"])),
])
def test_save_and_reload_is_exact(tmp_path, arch, cfg, monkeypatch):
    from safetensors import safe_open

    model = tiny_model(arch)
    report = quantize_model(model, cfg)
    save_quantized(model, _NoTokenizer(), tmp_path, cfg, report, source="tiny")
    meta = json.loads((tmp_path / "llmcourse.json").read_text())
    assert meta["format"] == "int8" and meta["method"] == cfg.method
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_tensor(k).dtype for k in keys if k.endswith(".qweight")}
    assert dtypes and set(dtypes.values()) == {torch.int8}
    if report["tied"]:
        assert not any(k.startswith("lm_head.") for k in keys)  # stored once
    # load_quantized needs a tokenizer: stub the HF tokenizer loader
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: None))
    lm = load_quantized(tmp_path, "fp32")
    assert lm.kind == "int8"
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert model_bytes(lm.model) == model_bytes(model)


def test_load_model_dispatches_to_int8_and_cli_roundtrip(tmp_path, capsys):
    """`quantize int8` writes a folder that `load_model` (core) and `eval perplexity` read back."""
    from transformers import AutoTokenizer  # noqa: F401  (the CLI loads a real tokenizer below)

    from llmcourse.cli import main
    from llmcourse.core.models import load_model

    src = tiny_folder(tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", "int8", "--model", str(src), "--out", str(out), "--method", "absmax", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantized_weight_ratio"] <= 0.27 and data["bytes_on_disk"] > 0
    lm = load_model(str(out))
    assert lm.kind == "int8" and isinstance(lm.model.model.layers[0].mlp.up_proj, Int8Linear)
    assert main(["eval", "perplexity", "--model", str(out), "--max-tokens", "64", "--max-length", "32",
                 "--stride", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sequences"][0]["token_ids"]) >= 1
    # refusals: output over its input, re-quantizing an int8 folder, bad flags
    assert main(["quantize", "int8", "--model", str(src), "--out", str(src)]) == 2
    assert main(["quantize", "int8", "--model", str(out), "--out", str(tmp_path / "qq")]) == 2
    assert main(["quantize", "int8", "--model", str(src), "--out", str(tmp_path / "g"), "--method", "llm.int8",
                 "--granularity", "group"]) == 2
    err = capsys.readouterr().err
    assert err.count("llmcourse: error:") == 3
    with pytest.raises(SystemExit):
        main(["quantize", "int8", "--model", str(src), "--out", str(tmp_path / "t"), "--threshold", "nan"])


def test_decoding_engine_runs_int8_model():
    """The decoding lab's fast Llama path calls our modules as module(x); greedy tokens match HF's."""
    dec = pytest.importorskip("llmcourse.decoding", reason="decoding lab not present")
    model = tiny_model("llama")
    quantize_model(model, Int8Config("absmax", "row"))
    prompt = _tokens(8)[0].tolist()
    cfg = dec.GenerationConfig(strategy="greedy", max_new_tokens=8, eos_token_ids=())
    fast = dec.generate(model, None, prompt, dec.GenerationConfig(**{**cfg.__dict__, "backend": "fast"}))
    hf = dec.generate(model, None, prompt, dec.GenerationConfig(**{**cfg.__dict__, "backend": "hf"}))
    assert fast.sequences[0].token_ids == hf.sequences[0].token_ids


def test_reload_in_bf16(tmp_path, monkeypatch):
    import transformers

    model = tiny_model("llama")
    cfg = Int8Config("absmax", "row")
    report = quantize_model(model, cfg)
    save_quantized(model, _NoTokenizer(), tmp_path, cfg, report)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: None))
    lm = load_quantized(tmp_path, "bf16")
    ids = _tokens()
    with torch.no_grad():
        out = lm.model(ids).logits
        one = lm.model(ids[:, :1]).logits
        ref = model(ids).logits
    assert out.dtype == torch.bfloat16 and one.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(UserError):
        load_quantized(tmp_path, "fp8")
