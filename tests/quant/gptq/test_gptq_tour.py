"""The GPTQ tour section in quick mode (first block of the default model)."""

from __future__ import annotations

import pytest

from llmcourse.core.report import TourContext


@pytest.mark.slow
def test_quick_tour_section(tmp_path, default_lm):
    from llmcourse.quant.gptq.tour import section

    ctx = TourContext(out_dir=tmp_path, quick=True)
    ctx._lm = default_lm
    sec = section(ctx)
    rows = sec.summary["layers"]
    assert len(rows) == 7 and all(r["gptq_error"] <= r["rtn_error"] for r in rows)
    assert (tmp_path / "gptq_layer_error.png").exists()
    assert sec.summary["seconds"] < 30
    assert sum(1 for _ in default_lm.model.modules() if type(_).__name__ == "GPTQLinear") == 0  # untouched


def test_score_windows_equals_core_perplexity_and_compare():
    """The tour scores every model in one pass per window: the same numbers as core perplexity and compare."""
    import math

    import torch
    from conftest import tiny_model

    from llmcourse.core.evaluate import compare, perplexity
    from llmcourse.quant.gptq.tour import gap, score_windows

    ref, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    s = score_windows({"ref": ref, "other": other}, ref, ids, tokens=200, window=64)
    n = sum(s["other"]["n"])
    nll = sum(x * k for x, k in zip(s["other"]["nll"], s["other"]["n"], strict=True)) / n
    assert math.isclose(math.exp(nll), perplexity(other, ids, max_length=64, stride=64)["perplexity"], rel_tol=1e-5)
    c = compare(other, ref, ids, max_length=64, max_tokens=200)
    # compare averages over every position of a window; score_windows too (per window, then weighted by targets)
    assert len(s["other"]["kl"]) == 4 and all(k == 0 for k in s["ref"]["kl"])
    assert math.isclose(sum(s["other"]["kl"]) / 4, c["kl_divergence"], rel_tol=0.05)
    d, se = gap([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d == 2.0 and math.isclose(se, 1 / 3 ** 0.5)
