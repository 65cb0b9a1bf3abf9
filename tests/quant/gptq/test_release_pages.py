"""GPTQ hands back the pages of the weights it replaced: file pages dropped, other memory untouched."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmcourse.quant.gptq.model import release_file_pages


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_file_pages_of_a_replaced_weight_are_dropped_and_still_read_back(tmp_path: Path) -> None:
    w = torch.randn(4096, 4096)  # 64 MiB
    save_file({"w": w, "b": torch.ones(8)}, str(tmp_path / "m.safetensors"))
    mapped = load_file(str(tmp_path / "m.safetensors"))["w"]
    assert torch.equal(mapped, w)  # every page read: resident
    before = _rss_file_mb()
    release_file_pages([mapped])
    assert before - _rss_file_mb() > 48
    assert torch.equal(mapped, w)  # clean pages come back from the file unchanged


def test_memory_that_is_not_a_file_mapping_is_left_alone() -> None:
    w = torch.randn(2048, 2048)
    copy = w.clone()
    release_file_pages([w, w[1:, 3:]])
    assert torch.equal(w, copy)
