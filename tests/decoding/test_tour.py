"""The decoding tour section in quick mode (default model)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_tour_section_quick(tmp_path) -> None:
    from llmcourse.tour import run_tour

    summary = run_tour(tmp_path / "tour", quick=True, sections=["llmcourse.decoding.tour:section"])
    sec = summary["sections"]["Decoding strategies"]
    assert "error" not in sec
    assert sec["greedy_same_as_hf"] and sec["beam_same_as_hf"]
    assert sec["lookup_same_as_greedy"] and sec["lookup_tokens_per_forward"] > 1.2
    for name in ("decoding_greedy.png", "decoding_beam.png", "decoding_fulltree.png", "decoding_topk.png",
                 "decoding_nucleus.png", "decoding_temperature.png", "decoding_topk_bars.png",
                 "decoding_speculative.png"):
        assert (tmp_path / "tour" / name).stat().st_size > 1000
