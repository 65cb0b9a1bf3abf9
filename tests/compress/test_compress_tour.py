"""The compression tour section in quick mode (the default model's layer similarities, Wanda 2:4 on a copy)."""

from __future__ import annotations

import pytest

from llmcourse.core.report import TourContext


@pytest.mark.slow
def test_quick_tour_section(tmp_path, default_lm):
    from llmcourse.compress.tour import section

    ctx = TourContext(out_dir=tmp_path, quick=True)
    ctx._lm = default_lm
    sec = section(ctx)
    assert len(sec.summary["similarities"]) == 30 and len(sec.summary["dropped"]) == 8
    assert sec.summary["wanda_first_block_sparsity"] == 0.5
    assert (tmp_path / "compress_similarity.png").exists()
    assert len(default_lm.model.model.layers) == 30  # the shared model is untouched
    assert float((default_lm.model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) < 0.01
