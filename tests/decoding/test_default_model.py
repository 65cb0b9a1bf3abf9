"""The default model (SmolLM2-135M-Instruct, fp32): our fast path against transformers."""

from __future__ import annotations

import pytest
import torch

from llmcourse.core.data import load_text
from llmcourse.decoding import GenerationConfig, generate, prepare

pytestmark = pytest.mark.slow


def _prompts(tok, n: int) -> list[list[int]]:
    """n prompts of 4-24 tokens cut from the default evaluation text (a mix of lengths and topics)."""
    ids = tok(load_text("default", "eval")[:20000]).input_ids
    out, pos = [], 0
    for i in range(n):
        length = 4 + (i * 7) % 21
        out.append(ids[pos:pos + length])
        pos += 211
    return out


def test_fast_logits_match_transformers(default_lm) -> None:
    """Tolerance: 1e-4 absolute on logits of magnitude ~20 (the products are summed in another order)."""
    model, tok = default_lm.model, default_lm.tokenizer
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is").input_ids])
    with torch.inference_mode():
        ref = model(ids).logits[0].float()
    fast = prepare(model)
    t = ids.shape[1]
    session = fast.session(1, t + 1)
    got = [session.prefill(ids[:, :4])[0]]
    for i in range(4, t):
        got.append(session.step(ids[:, i])[0])
    torch.testing.assert_close(torch.stack(got), ref[3:], rtol=0, atol=1e-4)


def test_greedy_identical_to_generate_20_prompts_64_tokens(default_lm) -> None:
    model, tok = default_lm.model, default_lm.tokenizer
    cfg = GenerationConfig(max_new_tokens=64)
    for prompt in _prompts(tok, 20):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, len(prompt):]
        out = generate(model, tok, prompt, cfg)
        assert out.backend == "fast"
        assert out.sequences[0].token_ids == ref.tolist(), tok.decode(prompt)


def test_beam4_identical_to_generate(default_lm) -> None:
    model, tok = default_lm.model, default_lm.tokenizer
    prompt = tok("I have a dream").input_ids
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, num_beams=4, num_return_sequences=2,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = generate(model, tok, prompt, GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=16,
                                                        num_return_sequences=2))
    for i in range(2):
        n = int((ref.beam_indices[i] != -1).sum())
        assert out.sequences[i].token_ids == ref.sequences[i, len(prompt):len(prompt) + n].tolist()
        assert abs(out.sequences[i].score - float(ref.sequences_scores[i])) <= 1e-4


def test_compiled_step_logits_match(default_lm) -> None:
    """The compiled decode step on the default model: same tolerance as the mm layout."""
    from llmcourse.core.runtime import FastModel

    model, tok = default_lm.model, default_lm.tokenizer
    ids = torch.tensor([tok("I have a dream that one day").input_ids])
    with torch.inference_mode():
        ref = model(ids).logits[0].float()
    fast = FastModel(model, matvec="compiled")
    t = ids.shape[1]
    session = fast.session(1, t)
    got = [session.prefill(ids[:, :2])[0]]
    for i in range(2, t):
        got.append(session.step(ids[:, i])[0])
    torch.testing.assert_close(torch.stack(got), ref[1:], rtol=0, atol=1e-4)
