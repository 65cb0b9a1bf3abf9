"""The evaluation tour section on the default model (quick mode)."""

from __future__ import annotations

import pytest

from llmcourse.core.report import TourContext


@pytest.mark.slow
def test_quick_section(default_lm, tmp_path):
    from llmcourse.evaluation.tour import section

    ctx = TourContext(tmp_path, quick=True)
    ctx._lm = default_lm
    s = section(ctx)
    assert [r["task"] for r in s.summary["results"]] == ["arc_easy", "piqa"]
    assert all(r["n"] == 4 and 0 <= r["metrics"]["acc"] <= 1 for r in s.summary["results"])
    assert (tmp_path / "evaluation_scores.png").is_file()
