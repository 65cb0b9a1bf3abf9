"""Each warper/processor masks exactly what transformers' class masks; nothing is modified in place."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation import logits_process as lp

from llmcourse.core.errors import UserError
from llmcourse.decoding import samplers
from llmcourse.decoding.engine import GenerationConfig, TextStream


def _logits(seed: int, rows: int = 4, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


CASES = [
    (lambda z, ids: samplers.top_k(z, 7), lambda: lp.TopKLogitsWarper(7)),
    (lambda z, ids: samplers.top_k(z, 1, min_keep=3), lambda: lp.TopKLogitsWarper(1, min_tokens_to_keep=3)),
    (lambda z, ids: samplers.top_p(z, 0.6), lambda: lp.TopPLogitsWarper(0.6)),
    (lambda z, ids: samplers.top_p(z, 0.05, min_keep=2), lambda: lp.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
    (lambda z, ids: samplers.min_p(z, 0.1), lambda: lp.MinPLogitsWarper(0.1)),
    (lambda z, ids: samplers.min_p(z, 0.9, min_keep=3), lambda: lp.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
    (lambda z, ids: samplers.typical_p(z, 0.5), lambda: lp.TypicalLogitsWarper(0.5)),
    (lambda z, ids: samplers.typical_p(z, 0.9, min_keep=4), lambda: lp.TypicalLogitsWarper(0.9, min_tokens_to_keep=4)),
    (lambda z, ids: samplers.epsilon_cutoff(z, 3e-3), lambda: lp.EpsilonLogitsWarper(3e-3)),
    (lambda z, ids: samplers.eta_cutoff(z, 2e-3), lambda: lp.EtaLogitsWarper(2e-3)),
    (lambda z, ids: samplers.temperature(z, 0.7), lambda: lp.TemperatureLogitsWarper(0.7)),
    (lambda z, ids: samplers.repetition_penalty(z, ids, 1.3), lambda: lp.RepetitionPenaltyLogitsProcessor(1.3)),
    (lambda z, ids: samplers.no_repeat_ngram(z, ids, 2), lambda: lp.NoRepeatNGramLogitsProcessor(2)),
    (lambda z, ids: samplers.no_repeat_ngram(z, ids, 3), lambda: lp.NoRepeatNGramLogitsProcessor(3)),
    (lambda z, ids: samplers.no_repeat_ngram(z, ids, 1), lambda: lp.NoRepeatNGramLogitsProcessor(1)),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_transformers_and_never_in_place(i: int) -> None:
    ours, theirs = CASES[i]
    for seed in range(5):
        z = _logits(seed)
        ids = torch.randint(0, 12, (4, 30), generator=torch.Generator().manual_seed(seed))  # repeats likely
        before = z.clone()
        got = ours(z, ids)
        assert torch.equal(z, before), "input modified in place"
        want = theirs()(ids, z.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens masked
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_frequency_presence_penalty() -> None:
    z = torch.zeros(1, 5)
    ids = torch.tensor([[1, 1, 3]])
    out = samplers.frequency_presence_penalty(z, ids, 0.5, 0.25)
    assert out.tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0]]
    assert torch.equal(z, torch.zeros(1, 5))


def test_chains_differ_in_temperature_order() -> None:
    """llama.cpp truncates before the temperature; transformers after: min-p sees different distributions."""
    z = _logits(3, rows=1)
    s = samplers.SamplerSettings(temperature=3.0, min_p=0.2)
    hf = samplers.apply_chain(z, torch.zeros(1, 0, dtype=torch.long), s, samplers.CHAINS["hf"])
    cpp = samplers.apply_chain(z, torch.zeros(1, 0, dtype=torch.long), s, samplers.CHAINS["llama.cpp"])
    assert int(torch.isfinite(hf).sum()) > int(torch.isfinite(cpp).sum())


@pytest.mark.parametrize("chain", ["hf", "llama.cpp"])
def test_sampled_frequencies_pass_chi_square(chain: str) -> None:
    z = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0]])
    s = samplers.SamplerSettings(temperature=0.8, top_k=6, top_p=0.95)
    processed = samplers.apply_chain(z, torch.zeros(1, 0, dtype=torch.long), s, samplers.CHAINS[chain])
    probs = torch.softmax(processed, dim=-1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.multinomial(probs.expand(n, -1), 1, generator=g).flatten()
    counts = torch.bincount(draws, minlength=8).double()
    kept = probs[0] > 0
    assert counts[~kept].sum() == 0  # filtered tokens are never drawn
    expected = probs[0][kept].double() * n
    assert chisquare(counts[kept].numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("kw,flag", [
    (dict(top_p=1.5), "--top-p"), (dict(top_p=0.0), "--top-p"), (dict(temperature=-1.0), "--temperature"),
    (dict(temperature=0.0), "--temperature"), (dict(strategy="beam", num_beams=2, num_return_sequences=3),
                                               "--num-return-sequences"),
    (dict(top_k=-1), "--top-k"), (dict(min_p=2.0), "--min-p"), (dict(typical_p=0.0), "--typical-p"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"), (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(strategy="nucleus"), "--strategy"), (dict(chain="vllm"), "--chain"), (dict(early_stopping="maybe"),
                                                                              "--early-stopping"),
    (dict(num_beams=0), "--num-beams"), (dict(stop=("",)), "--stop"),
])
def test_bad_parameters_name_the_flag(kw: dict, flag: str) -> None:
    with pytest.raises(UserError, match=flag):
        GenerationConfig(**kw)


class _CharTokenizer:
    """Token i decodes to chr(i) (enough to test streaming and stop strings)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_possible_stop_prefix() -> None:
    s = TextStream(_CharTokenizer(), stop=("END",))
    pieces = [s.push(ord(c)) for c in "abcEN"]
    assert "".join(pieces) == "abc"  # "EN" might start "END": held back
    s.push(ord("D"))
    assert s.stopped and s.text == "abc"
    s2 = TextStream(_CharTokenizer(), stop=("END",))
    out = "".join(s2.push(ord(c)) for c in "abENx") + s2.flush()
    assert out == "abENx" and not s2.stopped
