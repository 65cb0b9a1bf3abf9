"""GGUF models executed as stored blocks (``quant/gguf/execute.py``): what the loader keeps, the products
through transformers' forward and the runtime, and greedy tokens against llama.cpp on the same file."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from gguf_helpers import byte_tokenizer, llama_greedy

from llmcourse.core import models as core_models
from llmcourse.core.runtime import FastModel
from llmcourse.core.runtime.kernels import load as load_kernels
from llmcourse.quant.gguf.convert import convert_to_gguf as convert
from llmcourse.quant.gguf.load import load_model
from llmcourse.quant.gguf.presets import quantize_gguf

if not load_kernels():
    pytest.skip("the block kernels could not be built (no C++ compiler)", allow_module_level=True)

TINY = dict(vocab_size=264, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
PROMPTS = ["the hat in the cat", "a tin hat", "in the heat the ant sat", "hi", "then the a in"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("blocks")
    f32 = d / "f32.gguf"
    convert(tiny_model("llama", **TINY), byte_tokenizer(), f32, "f32", name="tiny", pre_tokenizer="gpt-2")
    out = {"F32": f32}
    for preset in ("Q8_0", "Q4_0", "Q4_K_M"):
        quantize_gguf(f32, d / f"{preset}.gguf", preset)
        out[preset] = d / f"{preset}.gguf"
    return out


def greedy(fast: FastModel, ids: list[int], n: int, eos: int | None) -> tuple[list[int], list[float]]:
    """Greedy tokens and the top-2 logit gap at each step."""
    s = fast.session(1, len(ids) + n + 8)
    logits = s.prefill(torch.tensor([ids]))
    out, gaps = [], []
    for _ in range(n):
        top = torch.topk(logits[0], 2).values
        t = int(logits[0].argmax())
        out.append(t)
        gaps.append(float(top[0] - top[1]))
        if t == eos:
            break
        logits = s.step(torch.tensor([t]))
    return out, gaps


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_loaded_as_blocks_and_close_to_the_float_model(files, preset):
    from llmcourse.quant.gguf.execute import BlockLinear

    lm = load_model(files[preset])
    ref = load_model(files[preset], blocks=False)
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert "BlockLinear" in kinds and "Linear" not in kinds
    card, ref_card = core_models.model_card(lm), core_models.model_card(ref)
    assert card["bytes_in_memory"] < 0.5 * ref_card["bytes_in_memory"]
    assert isinstance(lm.model.lm_head, BlockLinear)
    ids = torch.tensor([lm.tokenizer(PROMPTS[0]).input_ids])
    with torch.inference_mode():
        got, want = lm.model(ids).logits, ref.model(ids).logits
        fast = FastModel(lm.model, matvec="mm")
        stepped = fast.session(1, 64).prefill(ids)
    rel = (got - want).norm() / want.norm()
    assert float(rel) < 0.05  # only the 8-bit activations differ
    torch.testing.assert_close(stepped, got[:, -1], atol=1e-4, rtol=0)


def test_greedy_tokens_equal_llama_cpp_on_q8_0(files):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    lm = load_model(files["Q8_0"])
    fast = FastModel(lm.model, matvec="mm")
    compared = 0
    for text in PROMPTS:
        ids = lm.tokenizer(text).input_ids
        ours, gaps = greedy(fast, ids, 32, None)
        theirs = llama_greedy(files["Q8_0"], ids, 32, None)
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            if gaps[k] < 1e-3:  # a near-tie: the summation order may break it either way; stop comparing
                break
            assert a == b, f"{text!r}: token {k} differs ({a} vs llama.cpp's {b}); gap {gaps[k]:.4f}"
            compared += 1
    assert compared >= 100  # most of the 5 x 32 tokens were compared (all 5 x 64 were equal, 2026-12-07)


def test_compiled_step_runs_the_blocks(files):
    """The runtime's compiled decode step (the whole stack, norm and head in one compiled call) calls the same
    kernels (an opaque op inside the graph): its logits equal the eager step's within fp32 summation order."""
    from llmcourse.core.runtime.compile import can_compile

    if not can_compile():
        pytest.skip("no C++ compiler for TorchInductor")
    lm = load_model(files["Q4_K_M"])
    ids = lm.tokenizer(PROMPTS[2]).input_ids
    eager, compiled = FastModel(lm.model, matvec="mm"), FastModel(lm.model, matvec="compiled")
    assert compiled.layers_per_call == len(compiled.layers)
    with torch.inference_mode():
        s, e = compiled.session(1, 32), eager.session(1, 32)
        a, b = s.prefill(torch.tensor([ids])), e.prefill(torch.tensor([ids]))
        for _ in range(4):
            t = a.argmax(-1)
            a, b = s.step(t), e.step(t)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (1, 64) in compiled._warm


@pytest.mark.slow
def test_default_model_q8_0_greedy_equals_llama_cpp(default_lm, tmp_path):
    """64 greedy tokens on 5 prompts of the default model's Q8_0 file, ours vs llama.cpp: equal until a step whose
    top-2 logits are within 0.25 of each other.

    Each product equals llama.cpp's own (test_block_kernels: bit for bit for Q8_0), and the F32 file's logits agree
    to 5e-5; but the two fp32 graphs are not bit-identical, and a 1e-6 difference in a matmul's input flips an
    8-bit rounding now and then, which 30 layers amplify: the logits of the two engines differ by up to ~1 on this
    model (0.16 at the first position). Measured 2026-12-07: equal for 5, 35, 64, 22 and 57 tokens, each first
    difference at a near-tie (gap 0.026, 0.005, -, 0.21, 0.18)."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    from llmcourse.quant.gguf.convert import from_hf

    q8 = tmp_path / "q8.gguf"
    quantize_gguf(from_hf(default_lm.model, default_lm.tokenizer, "f32", folder=default_lm.path), q8, "Q8_0")
    lm = load_model(q8)
    fast = FastModel(lm.model, matvec="mm")
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
               "The three primary colors are", "Water boils at"]
    compared = 0
    for text in prompts:
        ids = lm.tokenizer(text).input_ids
        ours, gaps = greedy(fast, ids, 64, None)
        theirs = llama_greedy(q8, ids, 64, None)
        diff = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        if diff < len(ours):
            assert gaps[diff] < 0.25, f"{text!r}: token {diff} differs ({ours[diff]} vs {theirs[diff]}), gap {gaps[diff]:.3f}"
        compared += diff
    assert compared >= 100


def test_server_step_runs_the_blocks_in_one_compiled_call(files):
    """The batch server's one-row step on a GGUF model is the runtime's whole compiled stack over the block
    kernels (the attention window a symbol): the eager server step's logits within fp32 summation order."""
    from llmcourse.core.runtime.compile import can_compile
    from llmcourse.serve.batch import BatchSession

    if not can_compile():
        pytest.skip("no C++ compiler for TorchInductor")
    lm = load_model(files["Q8_0"])
    ids = lm.tokenizer(PROMPTS[0]).input_ids
    compiled = BatchSession(FastModel(lm.model, matvec="compiled"), 2, 64)
    eager = BatchSession(FastModel(lm.model, matvec="mm"), 2, 64)
    assert compiled.compiled and compiled.fast.layers_per_call == len(compiled.fast.layers)
    with torch.inference_mode():
        slots = [s.acquire() for s in (compiled, eager)]
        a, b = (s.prefill(slot, ids) for s, slot in zip((compiled, eager), slots, strict=True))
        for _ in range(3):
            t = a.argmax(-1)
            a, b = compiled.step([slots[0]], t), eager.step([slots[1]], t)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert compiled._warm == {1}
