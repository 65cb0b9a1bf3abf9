"""Tour section of the serving lab: the server on a free local port, 4 concurrent streaming clients.

``llmcourse serve`` starts in its own process (as a user runs it) on a free port of 127.0.0.1; four clients
of the official ``openai`` package stream a chat completion each at the same time; the section reports the
aggregate tokens/s, each client's time to first token and tokens/s, the server's ``/metrics``, and stops the
server (SIGTERM: it drains, then exits).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from llmcourse.core.report import TourContext, TourSection, html_table

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "What is the largest planet of the solar system?", "Who wrote Romeo and Juliet?"]
START_TIMEOUT = 120.0  # seconds for the server to answer /health (loading the model)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url/health`` answers (the server may still be warming up); raises if it never does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}: {proc.stderr.read()[-500:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def stream_one(client: Any, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    """One streaming chat completion: time to first token, tokens, seconds, and the answer."""
    t0 = time.monotonic()
    first, pieces, tokens = None, [], 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.monotonic() - t0
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    seconds = time.monotonic() - t0
    return {"question": question, "answer": "".join(pieces).strip(), "ttft_s": first or seconds,
            "tokens": tokens, "seconds": seconds, "tok/s": tokens / seconds if seconds else 0.0}


def section(ctx: TourContext) -> TourSection:
    from openai import OpenAI

    t_start = time.perf_counter()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_tokens = 16 if ctx.quick else 48
    cmd = [sys.executable, "-m", "llmcourse.cli", "serve", "--model", ctx.model_spec, "--port", str(port),
           "--max-batch", "4", "--ctx", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LLMCOURSE_PROGRESS": "0"})
    try:
        ready = wait_healthy(url, proc, START_TIMEOUT)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        results: list[dict[str, Any]] = [{} for _ in QUESTIONS]

        def run(i: int) -> None:
            results[i] = stream_one(client, ctx.model_spec, QUESTIONS[i], max_tokens)

        t0 = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        if not all(results):
            raise RuntimeError("a client got no answer")
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
            card = json.loads(r.read())["data"][0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results)
    rows = [{k: r[k] for k in ("question", "answer", "ttft_s", "tokens", "tok/s")} for r in results]
    sampling = {k: v for k, v in card.get("sampling_defaults", {}).items() if k != "source"}
    html = (f"<p><code>llmcourse serve --model {ctx.model_spec}</code> answered <code>/health</code> "
            f"{ready:.1f} s after it started (the decode step compiles in the background). Four clients of the "
            f"official <code>openai</code> package streamed one chat completion each, at the same time: "
            f"{total} tokens in {wall:.1f} s, <b>{total / wall:.1f} tokens/s</b> together; time to first "
            f"token {ttfts[0]:.2f}–{ttfts[-1]:.2f} s. Requests that set no sampling field get "
            f"{sampling} ({card.get('sampling_defaults', {}).get('source', '')}).</p>"
            + html_table(rows))
    summary = {"ready_seconds": ready, "clients": len(results), "tokens": total, "wall_seconds": wall,
               "aggregate_tokens_per_second": total / wall, "ttft_p50": ttfts[len(ttfts) // 2],
               "ttft_max": ttfts[-1], "answers": [r["answer"] for r in results]}
    return TourSection("Serving: an OpenAI-compatible server, 4 streaming clients", html, summary,
                       time.perf_counter() - t_start)
