"""The serving tour section: a real `llmcourse serve` process, 4 streaming openai clients, stopped after."""

from __future__ import annotations

from serve_helpers import tiny_folder  # noqa: F401  (fixture)

from llmcourse.core.report import TourContext
from llmcourse.serve.tour import section


def test_serving_section_runs_four_streaming_clients(tiny_folder, tmp_path):
    sec = section(TourContext(out_dir=tmp_path, quick=True, model_spec=str(tiny_folder)))
    s = sec.summary
    assert s["clients"] == 4 and s["tokens"] > 0 and s["aggregate_tokens_per_second"] > 0
    assert 0 < s["ttft_p50"] <= s["ttft_max"] and s["ready_seconds"] < 120
    assert "tokens/s" in sec.html and "<table>" in sec.html
