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
