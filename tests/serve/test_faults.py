"""Load and faults: auth, a full queue (429), a disconnect that frees its slot, timeouts, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
from serve_helpers import Running, free_port, server, tiny_folder, tiny_lm  # noqa: F401  (fixtures)

MSG = [{"role": "user", "content": "hi"}]


def slow_steps(running: Running, seconds: float = 0.02) -> None:
    """Make every decode step of the server take ``seconds`` (so a stream stays open long enough to test)."""
    session = running.app.state.batcher.session
    step = session.step

    def slow(*a, **kw):
        time.sleep(seconds)
        return step(*a, **kw)

    session.step = slow


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_api_key(tiny_lm):
    s = Running(tiny_lm, api_key="sesame", ctx=128)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        out = s.client(api_key="sesame").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


def test_queue_full_429_and_disconnect_frees_slot(tiny_lm):
    s = Running(tiny_lm, max_batch=1, max_queue=1, ctx=256)
    batcher = s.app.state.batcher
    slow_steps(s)
    try:
        body = {"prompt": "a", "max_tokens": 200, "stream": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", s.url + "/v1/completions", json=body) as first:
                lines = first.iter_lines()
                next(lines)  # the first token arrived: the one slot is busy
                assert batcher.free_slots == 0
                queued: dict = {}
                t = threading.Thread(target=lambda: queued.update(r=httpx.post(
                    s.url + "/v1/completions", json={"prompt": "b", "max_tokens": 3}, timeout=30)))
                t.start()
                wait_for(lambda: batcher.queue_depth == 1)
                full = httpx.post(s.url + "/v1/completions", json={"prompt": "c", "max_tokens": 3})
                assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
                assert full.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    s.client().completions.create(model="tiny", prompt="d", max_tokens=3)
                t0 = time.monotonic()
            # the stream is closed mid-way: its slot goes to the queued request at once
            t.join(10)
            assert queued["r"].status_code == 200 and time.monotonic() - t0 < 3.0
        wait_for(lambda: batcher.free_slots == 1)
        assert batcher.stats["completion_tokens"] < 150  # the abandoned stream did not run to its end
    finally:
        s.close()


def test_timeout_is_504(tiny_lm):
    s = Running(tiny_lm, timeout=0.3, ctx=256)
    slow_steps(s, 0.02)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 200}, timeout=30)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        wait_for(lambda: s.app.state.batcher.free_slots == 8)
    finally:
        s.close()


def test_sigterm_finishes_running_stream_then_exits(tiny_folder):
    port = free_port()
    env = {**os.environ, "LLMCOURSE_COMPILE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcourse", "serve", "--model", str(tiny_folder), "--port",
                             str(port), "--ctx", "512", "--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), timeout=60)
        got: list[str] = []
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": "a", "max_tokens": 480, "stream": True}, timeout=60) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 0:
                    proc.send_signal(signal.SIGTERM)
                if line:
                    got.append(line)
        assert got[-1] == "data: [DONE]" and '"finish_reason": null' not in got[-2]  # ended, not cut
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
