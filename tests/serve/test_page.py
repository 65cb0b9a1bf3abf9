"""The chat page in headless Chromium: a message typed and sent, the streamed answer shown (skipped without chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from serve_helpers import server, tiny_folder, tiny_lm  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_streams_an_answer(server, tmp_path):
    before = server.app.state.metrics.requests.get(("/v1/chat/completions", 200), 0)
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=20000", "--dump-dom", server.url + "/?q=Hello%20there"],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert '<div class="msg user">Hello there</div>' in dom
    answer = re.search(r'<div class="msg assistant"(?: data-done="1")?>(.+?)</div>', dom, re.S)
    assert answer is not None and answer.group(1), dom[-2000:]  # streamed text shown (maybe not all of it yet)
    assert server.app.state.metrics.requests.get(("/v1/chat/completions", 200), 0) == before + 1
