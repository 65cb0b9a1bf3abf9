"""One compute thread in this folder's tests: their tensors are small, and on the shared 2-core machine a
second thread that waits for a busy core made the default model's 30 blocks on 2 x 128 tokens take 26 s
instead of 2.2 s (measured 2026-12-07, load average ~10). Restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
