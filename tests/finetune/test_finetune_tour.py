"""The fine-tuning tour section in quick mode on the default model."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_tour_section_quick(tmp_path, default_lm):
    from llmcourse.core.report import TourContext
    from llmcourse.finetune.tour import section

    ctx = TourContext(out_dir=tmp_path, quick=True)
    ctx._lm = default_lm
    before = {n: p.detach().clone() for n, p in list(default_lm.model.named_parameters())[:3]}
    s = section(ctx)
    assert (tmp_path / "finetune_loss.png").exists() and "finetune_loss.png" in s.html
    assert 0 <= s.summary["accuracy_before"] <= 1 and 0 <= s.summary["accuracy_after"] <= 1
    assert s.summary["nf4_base_bytes"] < 0.5 * s.summary["fp32_base_bytes"]
    dpo = s.summary["dpo"]  # the short DPO run after SFT
    assert (tmp_path / "finetune_dpo_rewards.png").exists() and 0 <= dpo["accuracy_after_dpo"] <= 1
    assert dpo["steps"] == 3 and abs(dpo["first_loss"] - 0.6931) < 1e-3
    for n, p in list(default_lm.model.named_parameters())[:3]:  # the shared model is untouched
        assert p.equal(before[n])
