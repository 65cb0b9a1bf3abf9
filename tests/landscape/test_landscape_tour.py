"""The landscape tour section on the default model (quick mode)."""

from __future__ import annotations

import pytest
import torch

from llmcourse.core.report import TourContext


@pytest.mark.slow
def test_quick_section(default_lm, tmp_path):
    from llmcourse.landscape.tour import section

    ctx = TourContext(tmp_path, quick=True)
    ctx._lm = default_lm
    before = {n: p.detach().clone() for n, p in default_lm.model.named_parameters()}
    s = section(ctx)
    assert s.summary["grid"][2][2] == s.summary["base_loss"]
    assert (tmp_path / "landscape_contour.png").is_file()
    if "int8_line" in s.summary:
        assert s.summary["int8_line"][1] == s.summary["base_loss"]  # alpha = 0 is the fp32 model
        assert s.summary["int8_line"][3] == pytest.approx(s.summary["int8_loss"], abs=1e-4)  # alpha = 1
        assert (tmp_path / "landscape_int8_line.png").is_file()
    assert all(torch.equal(p.detach(), before[n]) for n, p in default_lm.model.named_parameters())
