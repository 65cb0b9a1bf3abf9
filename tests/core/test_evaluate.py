import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from hf_recipe import hf_recipe_perplexity

from llmcourse.core.errors import UserError
from llmcourse.core.evaluate import compare, perplexity


def exact_nll(model, ids, max_length, stride):
    """Brute force: every scored token's log-prob, computed one window at a time."""
    seq_len, prev_end, total, n = ids.size(1), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg = end - prev_end
        with torch.no_grad():
            logits = model(ids[:, begin:end]).logits[0]
        lp = F.log_softmax(logits[:-1].double(), -1)
        tgt = ids[0, begin + 1:end]
        tok_lp = lp.gather(1, tgt[:, None])[:, 0]
        k = min(trg, end - begin - 1)
        total -= tok_lp[-k:].sum().item()
        n += k
        prev_end = end
        if end == seq_len:
            break
    return total / n, n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("max_length,stride", [(64, 32), (64, 64), (50, 17), (128, 128)])
def test_perplexity_matches_hf_recipe(arch, max_length, stride):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 300), generator=g)
    ours = perplexity(model, ids, max_length=max_length, stride=stride)
    ref = hf_recipe_perplexity(model, ids, max_length, stride)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)
    nll, n = exact_nll(model, ids, max_length, stride)
    exact = perplexity(model, ids, max_length=max_length, stride=stride, weighting="exact")
    assert ours["tokens"] == exact["tokens"] == n
    assert exact["nll"] == pytest.approx(nll, rel=1e-5)


def test_perplexity_single_window_is_exact_mean_nll():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    r = perplexity(model, ids, max_length=64, stride=32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert r["tokens"] == 39
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_rejects_bad_windows():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    with pytest.raises(UserError, match="stride"):
        perplexity(model, ids, max_length=32, stride=64)
    with pytest.raises(UserError, match="context"):
        perplexity(model, ids, max_length=1000, stride=10)
    with pytest.raises(UserError, match="fewer than 2"):
        perplexity(model, ids[:, :1], max_length=32, stride=16)


def test_compare_identical_models_and_perturbed():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    same = compare(model, model, ids, max_length=64)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["tokens"] == 200
    other = tiny_model("llama", seed=5)
    diff = compare(other, model, ids, max_length=64)
    assert diff["kl_divergence"] > 0.01
    # KL computed by hand on the first window
    with torch.no_grad():
        lp = F.log_softmax(other(ids[:, :64]).logits[0].double(), -1)
        lq = F.log_softmax(model(ids[:, :64]).logits[0].double(), -1)
    kl0 = (lq.exp() * (lq - lp)).sum(-1)
    assert kl0.mean().item() > 0


@pytest.mark.slow
def test_default_model_perplexity_matches_hf_recipe(default_lm):
    from llmcourse.core.data import load_text, tokenize_stream

    ids = tokenize_stream(default_lm.tokenizer, load_text("default", "eval"))[:, :1280]
    ours = perplexity(default_lm.model, ids, max_length=512, stride=256)
    ref = hf_recipe_perplexity(default_lm.model, ids, 512, 256)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert 5 < ours["perplexity"] < 40
