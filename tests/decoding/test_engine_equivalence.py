"""Greedy, beam and seeded sampling against transformers' generate() on tiny random models (fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model

from llmcourse.decoding import GenerationConfig, generate

# auto = the runtime (FastModel) for llama/qwen2; gpt2 always runs through its HF module
GREEDY_CASES = [("llama", "auto"), ("llama", "hf"), ("qwen2", "auto"), ("qwen2", "hf"), ("gpt2", "auto")]


@pytest.mark.parametrize("arch,backend", GREEDY_CASES)
def test_greedy_ids_identical(arch: str, backend: str) -> None:
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        prompt = torch.randint(3, 256, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, len(prompt):]
        out = generate(model, None, prompt, GenerationConfig(max_new_tokens=64, backend=backend))
        assert out.sequences[0].token_ids == ref.tolist()


def _beam_case(model, prompt, k, lp, es, r, backend, max_new=10):
    """Run one configuration on both sides; return the number of hypotheses that ended with EOS.

    The ``hf`` backend (and GPT-2, which always uses it) calls the model exactly as generate() does,
    so sequences must be identical. FastModel's logits differ from transformers' by ~1e-7 (another
    summation order), so two hypotheses whose scores tie to float rounding may come out swapped:
    there a different sequence is accepted only with the same score within 1e-5.
    """
    exact = backend == "hf" or model.config.model_type == "gpt2"
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, num_beams=k, length_penalty=lp,
                             early_stopping=es, num_return_sequences=r, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    out = generate(model, None, prompt, GenerationConfig(
        strategy="beam", max_new_tokens=max_new, num_beams=k, length_penalty=lp, early_stopping=es,
        num_return_sequences=r, backend=backend))
    eos_hits = 0
    for i in range(r):
        n = int((ref.beam_indices[i] != -1).sum())  # transformers' generated length of this hypothesis
        want = ref.sequences[i, len(prompt):len(prompt) + n].tolist()
        got = out.sequences[i].token_ids
        gap = abs(out.sequences[i].score - float(ref.sequences_scores[i]))
        if exact or gap > 1e-5:
            assert got == want, (k, lp, es, r, i)
        assert gap <= 1e-4
        eos_hits += bool(got) and got[-1] == 2
    return eos_hits


FULL_GRID = list(itertools.product([2, 4, 5], [0.0, 1.0, 2.0], [True, False, "never"]))
# a Latin square of the grid: each value of each parameter 3 times, in 9 runs
LATIN = [c for i, c in enumerate(FULL_GRID) if (i // 9 + (i // 3) % 3 + i % 3) % 3 == 0]


@pytest.mark.parametrize("arch,vocab,backend,grid", [
    ("llama", 5, "auto", "full"), ("llama", 5, "hf", "full"), ("gpt2", 6, "auto", "latin"),
    ("qwen2", 12, "auto", "latin"), ("llama", 256, "auto", "latin")])
def test_beam_identical_grid(arch: str, vocab: int, backend: str, grid: str) -> None:
    """num_beams {2,4,5} x length_penalty {0,1,2} x early_stopping {True,False,never} x num_return_sequences.

    A tiny vocabulary makes EOS (id 2) likely, so hypotheses finish at many different steps.
    """
    model = tiny_model(arch, seed=3, vocab_size=vocab)
    gen = torch.Generator().manual_seed(vocab)
    eos_hits = 0
    for k, lp, es in FULL_GRID if grid == "full" else LATIN:
        prompt = torch.randint(3, vocab, (4,), generator=gen).tolist()
        r = int(torch.randint(1, k + 1, (1,), generator=gen))
        eos_hits += _beam_case(model, prompt, k, lp, es, r, backend)
    if vocab < 10:
        assert eos_hits >= 5  # the grid really exercised finished hypotheses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_with_repetition_penalty_and_ngram(arch: str) -> None:
    model = tiny_model(arch, seed=5, vocab_size=32)
    prompt = [5, 6, 7, 5, 6]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=3, repetition_penalty=1.3,
                             no_repeat_ngram_size=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = generate(model, None, prompt, GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=12,
                                                         repetition_penalty=1.3, no_repeat_ngram_size=2))
    n = int((ref.beam_indices[0] != -1).sum())
    assert out.sequences[0].token_ids == ref.sequences[0, 5:5 + n].tolist()
    assert abs(out.sequences[0].score - float(ref.sequences_scores[0])) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_seeded_sampling_draws_the_same_tokens_as_transformers(arch: str) -> None:
    """The hf chain reproduces the processed distribution bit for bit, so the same seed gives the same tokens."""
    model = tiny_model(arch)
    prompt = [10, 20, 30]
    kw = dict(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(123)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=True, **kw)[0, 3:].tolist()
    out = generate(model, None, prompt, GenerationConfig(strategy="sample", max_new_tokens=40, seed=123, backend="hf",
                                                         **kw))
    assert out.sequences[0].token_ids == ref


def test_greedy_with_penalties_matches_transformers() -> None:
    model = tiny_model("llama", seed=2)
    prompt = [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, repetition_penalty=1.5,
                             no_repeat_ngram_size=3)[0, 6:].tolist()
    out = generate(model, None, prompt, GenerationConfig(max_new_tokens=30, repetition_penalty=1.5,
                                                         no_repeat_ngram_size=3))
    assert out.sequences[0].token_ids == ref


class _Wrapped(torch.nn.Module):
    """Stands in for another lab's linear module (not an nn.Linear): must be called as module(x)."""

    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_swapped_linears_run_through_the_fast_path() -> None:
    model = tiny_model("llama", seed=4)
    prompt = [7, 8, 9, 10]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 4:].tolist()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    attn.k_proj = _Wrapped(attn.k_proj)
    mlp.down_proj = _Wrapped(mlp.down_proj)
    out = generate(model, None, prompt, GenerationConfig(max_new_tokens=20))
    assert out.backend == "fast" and out.sequences[0].token_ids == ref
    assert attn.k_proj.calls == 20 and mlp.down_proj.calls == 20  # prefill + 19 steps
