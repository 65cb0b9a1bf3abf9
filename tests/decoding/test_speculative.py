"""Speculative decoding: greedy output token-identical to plain greedy, sampled output with the target's
distribution (a chi-square test), the CLI contract, the strip plot and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from llmcourse.cli import main
from llmcourse.core.errors import UserError
from llmcourse.decoding import (
    GenerationConfig,
    PromptLookup,
    SpeculativeConfig,
    generate,
    samplers,
    speculative_generate,
)

# untied output head and a wide initialisation: peaked next-token distributions with clear argmax margins
# (the default tiny model's are nearly uniform, and the tied one repeats its last token forever)
PEAKED = {"tie_word_embeddings": False, "initializer_range": 0.2}


@pytest.fixture(scope="module")
def models():
    return {"target": tiny_model("llama", seed=0, **PEAKED), "wrong": tiny_model("llama", seed=1, **PEAKED),
            "repeats": tiny_model("llama", seed=0)}


def _prompts(n: int = 20) -> list[list[int]]:
    """Random prompts that repeat part of themselves, so prompt lookup finds earlier n-grams."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        base = torch.randint(3, 256, (4 + i % 7,), generator=g).tolist()
        out.append(base + base[: len(base) // 2] + base)
    return out


def _configs(i: int) -> GenerationConfig:
    """Plain greedy for most prompts; penalties (which read the drafted context) and an EOS on some."""
    extra = [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {}][i % 4]
    eos = (7, 11) if i % 5 == 0 else ()
    return GenerationConfig(max_new_tokens=16, eos_token_ids=eos, **extra)


def test_prompt_lookup_takes_the_most_recent_occurrence() -> None:
    look = PromptLookup(2)
    assert look.propose([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    assert look.propose([1, 2, 3, 4, 1, 2, 9, 1, 2], 2) == [9, 1]  # grown incrementally: the latest match
    assert look.propose([1, 2, 3, 4, 1, 2, 9, 1, 2, 5], 2) == []
    assert PromptLookup(1).propose([7, 8, 7], 5) == [8, 7]


def test_prompt_lookup_prefers_the_longest_ngram_and_measures_the_match() -> None:
    look = PromptLookup(3, 1)
    text = [5, 1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3]
    assert look.match(text) == (4, 3)  # 1 2 3 at 1..3; 5 1 2 3 != 6 1 2 3
    assert look.propose(text, 2) == [9, 8]  # the 3-gram's continuation, not the 2-gram "2 3"'s latest (7)
    assert look.match([*text, 4]) == (0, 0)  # 4 never occurred before
    assert look.match([*text, 4, 2]) == (12, 1)  # a 1-gram: the latest earlier "2" (at 11)
    assert PromptLookup(3).match([*text, 4, 2]) == (0, 0)  # one size only (the server's)
    long = [4, 5, 6, 7, 8, 9, 0, 4, 5, 6, 7, 8]
    assert PromptLookup(2, 1).match(long) == (5, 5)  # matched beyond the largest size: 4 5 6 7 8
    # of two occurrences of "2 3", the one after "1" (as the text's end) wins over the latest
    assert PromptLookup(2, 1).match([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]) == (3, 3)
    with pytest.raises(ValueError):
        PromptLookup(2, 3)


def test_lookup_policy_drafts_by_expected_tokens_per_cost() -> None:
    from llmcourse.decoding.speculative import LookupPolicy

    widths = (4, 8, 12, 16)
    step = {1: 1.0, 4: 1.5, 8: 2.6, 12: 3.7, 16: 4.8}

    def padded(t: int) -> float:
        return step[next(w for w in (1, *widths) if w >= t)]

    policy = LookupPolicy(11, padded)
    assert policy.choose(0, 11) == 0  # nothing matched: a plain step
    assert policy.choose(1, 11) == 0  # a one-token match: 30% likely, not worth 1.5 steps
    assert policy.choose(8, 11) in (7, 11)  # a long match: fill a width (padding costs the same)
    assert policy.choose(8, 2) == 2  # all that there is to copy
    assert LookupPolicy(11, lambda t: 2.0 * t - 1).choose(9, 11) == 0  # each position dearer than a step
    # the estimate moves with what the target accepts
    a = policy.accept_prob(3)
    for _ in range(20):
        policy.observe(3, 1, 0)  # a draft after a 3-token match, rejected
    assert policy.accept_prob(3) < a / 4 and policy.choose(3, 11) == 0
    policy.observe(5, 4, 2)  # drafts at match lengths 5, 6 accepted, 7 rejected, 8 never judged
    assert policy.seen[4:8] == [1, 1, 1, 0] and policy.hits[4:8] == [1, 1, 0, 0]
    assert policy.expected_tokens(9, 2) == pytest.approx(1 + 0.85 + 0.85 * 0.9)  # the priors of 9 and 10+
    # with cheap 2-position verification, a short match is worth one drafted token
    assert LookupPolicy(11, lambda t: 1.0 + 0.1 * (t - 1)).choose(2, 11) >= 1


def test_verify_costs_of_the_uncompiled_path(models) -> None:
    from llmcourse.decoding.engine import prepare
    from llmcourse.decoding.speculative import verify_costs

    cost = verify_costs(prepare(models["target"], "mm"), 64, 7)
    assert cost(1) == 1.0 and cost(2) < cost(4) < cost(8)


def test_greedy_is_token_identical_to_plain_greedy(models) -> None:
    totals = {name: [0, 0] for name in ("lookup", "lookup-repeats", "self", "wrong")}
    for i, prompt in enumerate(_prompts()):
        cfg = _configs(i)
        for target_name in ("target", "repeats") if i % 2 == 0 else ("target",):
            target = models[target_name]
            ref = generate(target, None, prompt, cfg).sequences[0]
            runs = [("lookup" if target_name == "target" else "lookup-repeats",
                     SpeculativeConfig("lookup", draft_tokens=3 + i % 3, lookup_ngram=1 + i % 2), None)]
            if target_name == "target":
                runs += [("self", SpeculativeConfig("draft", draft_tokens=4, draft_model="self"), target),
                         ("wrong", SpeculativeConfig("draft", draft_tokens=3, draft_model="wrong"), models["wrong"])]
            for name, spec, draft in runs:
                out = speculative_generate(target, None, prompt, cfg, spec, draft_model=draft)
                got = out.sequences[0]
                assert got.token_ids == ref.token_ids, (i, name)
                assert got.finish_reason == ref.finish_reason
                assert got.score == pytest.approx(ref.score, abs=1e-3)
                st = out.stats
                assert st.generated == len(ref.token_ids) and st.target_forwards <= st.generated
                totals[name][0] += st.accepted
                totals[name][1] += st.drafted
    # every path was taken: lookup drafts accepted and rejected, a model drafting for itself always right
    for name in ("lookup", "wrong"):
        accepted, drafted = totals[name]
        assert drafted > 0 and accepted < drafted, name
    # the repeating model: lookup drafts only where the copy is likely, and it is (35 of 35 here)
    assert totals["lookup-repeats"][0] > 0.5 * totals["lookup-repeats"][1] > 0
    assert totals["self"][0] == totals["self"][1] > 0


def _sequence_probs(model, prompt: list[int], cfg: GenerationConfig) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first ``max_new_tokens`` sampled tokens under the processed chain."""
    order = samplers.CHAINS[cfg.chain]
    probs = {(): 1.0}
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            nxt = {}
            for seq, p in probs.items():
                ids = torch.tensor([prompt + list(seq)])
                z = samplers.apply_chain(model(input_ids=ids).logits[:, -1].float(), ids, cfg, order)
                for t, pt in enumerate(torch.softmax(z[0], -1).tolist()):
                    if pt > 0:
                        nxt[(*seq, t)] = p * pt
            probs = nxt
    return probs


def test_acceptance_rule_keeps_p() -> None:
    """Leviathan et al.'s Theorem 1 on one position: x ~ q, accepted with min(1, p(x)/q(x)), else a draw
    from norm(max(0, p - q)) — the emitted token is distributed as p (q a distribution, or one-hot)."""
    from scipy.stats import chisquare

    from llmcourse.decoding.speculative import _accept

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    n = 4000
    for q in (torch.tensor([0.1, 0.5, 0.05, 0.05, 0.1, 0.2]), None):
        counts = torch.zeros(6)
        for _ in range(n):
            x = 1 if q is None else int(torch.multinomial(q, 1, generator=g))
            n_accepted, t = _accept(torch.stack([p, p]), [x], None if q is None else [q], False, g)
            counts[x if n_accepted == 1 else t] += 1  # the first emitted token: the draft, or the correction
        assert chisquare(counts.tolist(), (n * p).tolist()).pvalue > 1e-3, counts


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_sampling_keeps_the_target_distribution(mode) -> None:
    """The whole loop (drafts, one verification forward, rollback, the chain's context) on a small model:
    the distribution of the first 4 sampled tokens is the target's, exactly computed."""
    from scipy.stats import chisquare

    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    if mode == "lookup":  # the repeating model at a low temperature: its last token is likely, not certain
        target, draft, prompt = tiny_model("llama", seed=0, **small), None, [9, 40, 9, 40, 9]
        cfg_kw = {"temperature": 0.1}
    else:  # a perturbed copy drafts: its top tokens and probabilities differ a little (about 40% accepted)
        target, draft, prompt = (tiny_model("llama", seed=0, **PEAKED, **small),
                                 tiny_model("llama", seed=0, **PEAKED, **small), [5, 17, 33, 9, 100])
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for prm in draft.parameters():
                prm.add_(torch.randn(prm.shape, generator=g) * 0.02)
        cfg_kw = {"temperature": 1.5}
    spec = SpeculativeConfig(mode, draft_tokens=2, lookup_ngram=1, draft_model="x" if draft is not None else None)
    sequences, accepted, drafted = [], 0, 0
    for i in range(16):  # 16 x 50 draws, each call with its own seed
        cfg = GenerationConfig(strategy="sample", top_k=2, max_new_tokens=4, eos_token_ids=(), seed=1000 + i,
                               num_return_sequences=50, **cfg_kw)
        out = speculative_generate(target, None, prompt, cfg, spec, draft_model=draft)
        sequences += [tuple(s.token_ids) for s in out.sequences]
        accepted, drafted = accepted + out.stats.accepted, drafted + out.stats.drafted
    assert 0.05 < accepted / drafted < 0.95, (accepted, drafted)  # accepted and rejected drafts both occur
    n = len(sequences)
    exact = _sequence_probs(target, prompt, cfg)
    counts = dict.fromkeys(exact, 0)
    for seq in sequences:
        counts[seq] += 1  # a KeyError would be a sequence the target cannot produce
    big = [c for c in exact if exact[c] * n >= 5]
    rest = [c for c in exact if c not in big]
    obs = [counts[c] for c in big] + ([sum(counts[c] for c in rest)] if rest else [])
    exp = [exact[c] * n for c in big] + ([n * sum(exact[c] for c in rest)] if rest else [])
    assert sum(exp) == pytest.approx(n)
    exp = [e * sum(obs) / sum(exp) for e in exp]  # exactly the observed total (float rounding)
    assert chisquare(obs, exp).pvalue > 1e-3, list(zip(obs, exp, strict=True))


def test_bad_configs_raise_user_errors(models) -> None:
    for kw, flag in [({"draft_tokens": 0}, "--draft-tokens"), ({"lookup_ngram": 0}, "--lookup-ngram"),
                     ({"speculative": "draft"}, "--draft-model")]:
        with pytest.raises(UserError, match=flag):
            SpeculativeConfig(**{"speculative": "lookup", **kw})
    other = tiny_model("llama", seed=2, vocab_size=128)
    with pytest.raises(UserError, match="vocabulary"):
        speculative_generate(models["target"], None, [5, 6, 7], GenerationConfig(max_new_tokens=4),
                             SpeculativeConfig("draft", draft_model="other"), draft_model=other)
    with pytest.raises(UserError, match="beam"):
        speculative_generate(models["target"], None, [5, 6, 7], GenerationConfig(strategy="beam"),
                             SpeculativeConfig("lookup"))


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # the core tests' GGUF writer
    from tiny_gguf import write_tiny_llama_gguf

    d = tmp_path_factory.mktemp("spec")
    write_tiny_llama_gguf(tiny_model("llama", **PEAKED), d / "tiny.gguf")
    write_tiny_llama_gguf(tiny_model("llama", seed=3, vocab_size=128), d / "other.gguf")
    return d


@pytest.mark.parametrize("extra", [["--speculative", "lookup", "--lookup-ngram", "1", "--draft-tokens", "3"],
                                   ["--speculative", "draft", "--draft-model", "{tiny}", "--strategy", "sample",
                                    "--seed", "3", "--top-k", "5"]])
def test_generate_speculative_json_and_strip(ggufs, tmp_path, capsys, extra) -> None:
    tiny = str(ggufs / "tiny.gguf")
    strip = tmp_path / "strip.png"
    args = ["generate", "--model", tiny, "--prompt", "hello hello hello", "--max-new-tokens", "12", "--json",
            "--tree", str(strip), *[a.replace("{tiny}", tiny) for a in extra]]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    st = data["speculative"]
    assert st["mode"] == extra[1] and 0.0 <= st["acceptance_rate"] <= 1.0
    assert st["tokens_per_target_forward"] >= 1.0 and st["target_forwards"] >= 1
    assert len(data["sequences"][0]["token_ids"]) == 12 and data["tokens_per_second"] > 0
    assert strip.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if extra[1] == "lookup":  # greedy: the plain command's tokens
        assert main(["generate", "--model", tiny, "--prompt", "hello hello hello", "--max-new-tokens", "12",
                     "--json"]) == 0
        plain = json.loads(capsys.readouterr().out)["sequences"][0]
        got = data["sequences"][0]
        assert plain["token_ids"] == got["token_ids"] and plain["text"] == got["text"]
        assert plain["score"] == pytest.approx(got["score"], abs=1e-4)


@pytest.mark.parametrize("args,needle", [
    (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens"),
    (["--speculative", "lookup", "--draft-tokens", "-2"], "--draft-tokens"),
    (["--speculative", "lookup", "--lookup-ngram", "0"], "--lookup-ngram"),
    (["--speculative", "draft"], "--draft-model"),
    (["--draft-model", "{tiny}"], "--speculative draft"),
    (["--speculative", "lookup", "--strategy", "beam"], "beam"),
    (["--speculative", "draft", "--draft-model", "{other}"], "vocabulary"),
])
def test_generate_speculative_bad_input_is_one_line_exit_2(ggufs, tmp_path, capsys, args, needle) -> None:
    strip = tmp_path / "strip.png"
    args = [a.replace("{tiny}", str(ggufs / "tiny.gguf")).replace("{other}", str(ggufs / "other.gguf"))
            for a in args]
    rc = main(["generate", "--model", str(ggufs / "tiny.gguf"), "--prompt", "hi", "--tree", str(strip), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not strip.exists()


# --- the default model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_greedy_identical(default_lm) -> None:
    """On the real model (compiled one-token step, eager multi-token verification): same tokens, and an
    input-grounded prompt is mostly copied."""
    from llmcourse.core.data import load_texts

    text = next(t for t in load_texts("default", split="eval") if 400 < len(t) < 1200)
    prompt = f"{text}\n\nRepeat the first sentence of the text above.\n"
    cfg = GenerationConfig(max_new_tokens=48, eos_token_ids=())
    ref = generate(default_lm.model, default_lm.tokenizer, prompt, cfg).sequences[0].token_ids
    look = speculative_generate(default_lm.model, default_lm.tokenizer, prompt, cfg, SpeculativeConfig("lookup"))
    assert look.sequences[0].token_ids == ref
    assert look.stats.tokens_per_target_forward > 1.2, look.stats
    spec = SpeculativeConfig("draft", draft_tokens=4, draft_model="default")
    own = speculative_generate(default_lm.model, default_lm.tokenizer, prompt[:300],
                               GenerationConfig(max_new_tokens=16, eos_token_ids=()), spec,
                               draft_model=default_lm.model)
    plain = generate(default_lm.model, default_lm.tokenizer, prompt[:300],
                     GenerationConfig(max_new_tokens=16, eos_token_ids=())).sequences[0].token_ids
    assert own.sequences[0].token_ids == plain and own.stats.acceptance_rate > 0.9
