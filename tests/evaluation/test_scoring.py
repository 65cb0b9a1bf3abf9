"""Scoring: lm-eval's request tokenisation, prefix-shared log-likelihoods equal to one full forward per
request (tiny random Llama / Qwen2 / GPT-2), acc / acc_norm and lm-eval's standard errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_default_tokenizer, tiny_model

from llmcourse.core.errors import UserError
from llmcourse.evaluation.packing import batches, build_tree, packable, tree_mask
from llmcourse.evaluation.scoring import (
    Scorer,
    choice_metrics,
    encode_pair,
    mean_stderr,
    pooled_stderr,
    tok_encode,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The default model's tokenizer (SmolLM2 BPE, 49152 tokens), without its weights."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    copy_default_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def lm_eval_encode_pair(tok, context: str, continuation: str):
    """lm-eval 0.4.13 ``TemplateLM._encode_pair`` (causal), written out as the reference."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def full_forward_ll(model, ctx: list[int], cont: list[int], max_length: int):
    """lm-eval ``HFLM._loglikelihood_tokens`` at batch size 1: one forward over (ctx + cont)[-(L+1):][:-1]."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    logits = model(torch.tensor([inp])).logits[0].float()
    logp = F.log_softmax(logits, -1)[len(inp) - len(cont):]
    tgt = torch.tensor(cont)
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


REQUESTS = {
    "shared context": [("Question: Which gas do plants take in?\nAnswer:", c) for c in
                       (" carbon dioxide", " oxygen", " nitrogen gas from the air", " water")],
    "one-token choices": [("The answer is", c) for c in (" A", " B", " C", " D")],
    "trailing space": [("Fill in: the cat sat on the ", c) for c in ("mat", "hat and the dog")],
    "partial (winogrande)": [(f"Sarah was a better surgeon than Maria so {o}", " always got the easier cases.")
                             for o in ("Sarah", "Maria")],
    "no shared token": [(c, " and so on.") for c in ("Alpha went", "Beta came")],
}


@pytest.mark.parametrize("text", ["hello world", "Question: x\nAnswer: ", "  two  spaces ", "naïve café"])
def test_encode_pair_matches_lm_eval(tokenizer, text):
    for cont in (" yes", "no", " a b"):
        assert encode_pair(tokenizer, text, cont) == lm_eval_encode_pair(tokenizer, text, cont)
    ctx, cont = encode_pair(tokenizer, "Answer: ", "42")
    assert tokenizer.decode(cont).startswith(" ")  # the trailing space moved to the continuation


def test_empty_context_uses_prefix_token(tokenizer):
    ctx, cont = encode_pair(tokenizer, "", " hello")
    pid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert ctx == [pid] and cont == tok_encode(tokenizer, " hello", add_special_tokens=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("max_rows", [64, 1])
def test_prefix_shared_scores_equal_full_forwards(tokenizer, arch, max_rows):
    model = tiny_model(arch, vocab_size=49152)
    scorer = Scorer(model, tokenizer, max_rows=max_rows, packed=False)
    assert not scorer.packed
    for name, reqs in REQUESTS.items():
        enc = scorer.encode(reqs)
        got = scorer.score(enc)
        for (c, t), s in zip(enc, got, strict=True):
            ll, greedy = full_forward_ll(model, c, t, scorer.max_length)
            assert s.ll == pytest.approx(ll, abs=1e-4), (arch, name)
            assert s.is_greedy == greedy and s.n_tokens == len(t)


@pytest.mark.parametrize(("arch", "max_tokens"), [("llama", 4096), ("llama", 1), ("qwen2", 40), ("gpt2", 40)])
def test_packed_trees_equal_full_forwards(tokenizer, arch, max_tokens):
    """Every question at once (max_tokens 4096: one forward; 40: a few, short trees sharing rows; 1: one tree
    per forward)."""
    model = tiny_model(arch, vocab_size=49152)
    scorer = Scorer(model, tokenizer, max_tokens=max_tokens)
    assert scorer.packed
    questions = [scorer.encode(reqs) for reqs in REQUESTS.values()]
    done = []
    got = scorer.score_many(questions, on_done=done.append)
    assert sum(done) == len(questions)
    for name, enc, scored in zip(REQUESTS, questions, got, strict=True):
        for (c, t), s in zip(enc, scored, strict=True):
            ll, greedy = full_forward_ll(model, c, t, scorer.max_length)
            assert s.ll == pytest.approx(ll, abs=1e-4), (arch, name)
            assert s.is_greedy == greedy and s.n_tokens == len(t)


def test_tree_layout():
    """Shared prefix once, each branch continuing its positions, reads inside the prefix where a continuation
    starts there, and a mask where branches never see each other."""
    enc = [([5, 6, 7], [8, 9]), ([5, 6, 7], [8, 4, 2]), ([5, 6, 7], [3])]
    t = build_tree(enc, max_length=100)
    # inputs: 5 6 7 8 | 5 6 7 8 4 | 5 6 7 -> common prefix 5 6 7 (3 tokens)
    assert t.tokens == [5, 6, 7, 8, 8, 4] and t.positions == [0, 1, 2, 3, 3, 4]
    assert t.branch == [-1, -1, -1, 0, 1, 1]
    assert t.reads == [[2, 3], [2, 4, 5], [2]] and t.targets == [[8, 9], [8, 4, 2], [3]]
    # the tree, then a one-token tree packed after it in the same row, then padding
    br = torch.tensor([t.branch + [-1, -2]])
    seg = torch.tensor([[0] * 6 + [1, -1]])
    allowed = tree_mask(seg, br, torch.float32)[0, 0] == 0
    want = [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]
    assert allowed.int().tolist() == want
    # longest first: 9 and 7 fill two rows of width 9 (18 tokens); 5 opens a batch of width 5 where 2 gets a row
    assert batches([5, 9, 2, 7], max_tokens=18) == [[[1], [3]], [[0], [2]]]
    assert batches([9, 7, 2], max_tokens=18) == [[[0], [1, 2]]]  # 2 fits in the room 7 left


def test_models_the_tree_cannot_run_take_the_cached_path(tokenizer):
    model = tiny_model("gemma3_text", vocab_size=49152)
    assert not packable(model)
    scorer = Scorer(model, tokenizer)
    assert not scorer.packed
    enc = scorer.encode(REQUESTS["shared context"])
    for (c, t), s in zip(enc, scorer.score_many([enc])[0], strict=True):
        assert s.ll == pytest.approx(full_forward_ll(model, c, t, scorer.max_length)[0], abs=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_left_truncation_as_lm_eval(tokenizer, packed):
    model = tiny_model("llama", vocab_size=49152, max_position_embeddings=16)
    scorer = Scorer(model, tokenizer, packed=packed)
    assert scorer.max_length == 16 and scorer.packed == packed
    reqs = [("one two three four five six seven eight nine ten eleven twelve thirteen", c)
            for c in (" fourteen fifteen", " zero")]
    enc = scorer.encode(reqs)
    for (c, t), s in zip(enc, scorer.score(enc), strict=True):
        assert s.ll == pytest.approx(full_forward_ll(model, c, t, 16)[0], abs=1e-4)


def test_unscorable_requests_are_user_errors(tokenizer):
    small = tiny_model("llama")  # 256 tokens: SmolLM2's ids fall outside it
    with pytest.raises(UserError, match="vocabulary"):
        Scorer(small, tokenizer).encode([("Question: why?\nAnswer:", " because")])
    model = tiny_model("llama", vocab_size=49152)
    with pytest.raises(UserError, match="no token"):
        Scorer(model, tokenizer).encode([("Question", "")])


def test_metrics_as_lm_eval():
    # acc picks the largest log-likelihood, acc_norm divides by the choice's characters, ties go to the first
    m = choice_metrics([-10.0, -12.0], ["ab", "abcdefgh"], gold=1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (0, 1, 0.0, 1.0)
    assert choice_metrics([-1.0, -1.0], ["a", "b"], gold=1)["pred"] == 0
    # characters, not bytes: "é" is one character and two bytes
    m = choice_metrics([-3.5, -3.0], ["éé", "abc"], gold=0)
    assert m["pred_norm"] == 1 and m["acc_norm"] == 0.0  # -3.5/2 < -3/3 per character
    assert m["acc_bytes"] == 1.0  # -3.5/4 > -3/3 per byte


def test_stderr_as_lm_eval():
    vals = [1.0, 0.0, 1.0, 1.0, 0.0]
    mu = sum(vals) / 5
    assert mean_stderr(vals) == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in vals) / 4) / math.sqrt(5))
    assert mean_stderr([1.0]) is None
    rng = random.Random(0)
    groups = [[float(rng.random() < 0.4) for _ in range(n)] for n in (30, 50, 80)]
    pooled = pooled_stderr([mean_stderr(g) for g in groups], [len(g) for g in groups])
    assert pooled == pytest.approx(mean_stderr(sum(groups, [])), rel=0.05)  # lm-eval: "empirically matches"
