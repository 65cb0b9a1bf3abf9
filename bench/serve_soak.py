"""Soak run of `llmcourse serve`: many mixed requests, random disconnects, a full queue; memory stays flat.

Starts our server on 127.0.0.1 (a free port) with ``--model`` (default: the default model),
``--max-batch`` slots and a small ``--max-queue``, then sends ``--requests`` requests from
``--clients`` concurrent clients (more clients than slots + queue, so some are refused with 429).
Each request is drawn at random (seeded): chat or plain completion, streaming or not, a short,
medium or long prompt, 1-96 new tokens, greedy or sampled; some clients hang up mid-answer
(``--disconnect`` of them: after a few chunks, or before a non-streaming answer arrives); a few
requests are malformed or longer than the context (they must get 400).

Every request ends in exactly one class:

- answered: 200 and a whole answer (``[DONE]`` for a stream, a JSON body otherwise);
- refused cleanly: 429 with ``Retry-After``, or 400/413 for the requests built to be refused;
- disconnected: the client hung up on purpose (not an error);
- error: any other status, an error chunk, a malformed body, a connection failure;
- broken stream: a stream that ended without ``[DONE]`` while the client still listened.

The resident memory (RSS, from /proc) of the server process is read after a warm-up (every
bucket compiled, long prompts seen) and again at the end; the target is within 10%. After the
load the server must be idle again: ``/metrics`` shows no queue, no running batch and every slot
free (disconnects freed theirs).

    .venv/bin/python bench/serve_soak.py                   # 500 requests, at most --time-limit s
    .venv/bin/python bench/serve_soak.py --quick           # 20 requests: a smoke run
    .venv/bin/python bench/serve_soak.py --requests 200 --clients 12 --threads 2

Writes bench/results/serve_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import md_table, write_result  # noqa: E402
from serve import free_port, wait_healthy  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three uses of a paperclip.", "Why is the sky blue?", "Tell me about elephants.",
             "How do plants make food?", "What is a prime number?"]
PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when movable type made books "
             "cheaper to produce and easier to spread across Europe. Printers set letters by hand, inked them, "
             "and pressed paper onto the type, one sheet after another. ")
CLASSES = ("answered", "refused", "disconnected", "error", "broken")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (VmRSS of /proc/PID/status)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024


def draw(rng: random.Random, disconnect: float) -> dict:
    """One random request: its body, endpoint, and what the client does."""
    kind = rng.choices(["ok", "bad", "too_long"], [0.94, 0.03, 0.03])[0]
    size = rng.choices(["short", "medium", "long"], [0.6, 0.3, 0.1])[0]
    text = rng.choice(QUESTIONS)
    if size == "medium":
        text = PARAGRAPH + text
    elif size == "long":
        text = PARAGRAPH * 6 + text
    chat = rng.random() < 0.7
    body: dict = {"model": "default", "max_tokens": rng.choice([1, 8, 16, 32, 64, 96]),
                  "stream": rng.random() < 0.6}
    if rng.random() < 0.7:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1000))
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if kind == "bad":
        body["max_tokens"] = "many"  # a wrong type: 400
    elif kind == "too_long":
        body["messages" if chat else "prompt"] = ([{"role": "user", "content": PARAGRAPH * 80}] if chat
                                                  else PARAGRAPH * 80)  # beyond the context: 400
    hang_up = kind == "ok" and rng.random() < disconnect
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "kind": kind,
            "hang_up_after": rng.randint(1, 6) if hang_up else None}


async def one(client, url: str, req: dict) -> dict:
    """Send ``req``; -> {"class": one of CLASSES, "tokens": content chunks or completion tokens, "why": ...}."""
    import httpx2 as httpx

    body, stream, hang = req["body"], req["body"]["stream"], req["hang_up_after"]
    expect_400 = req["kind"] != "ok"
    try:
        if not stream:
            coro = client.post(url + req["path"], json=body)
            if hang is None:
                r = await coro
            else:  # hang up before the answer comes: the server must free the slot
                try:
                    r = await asyncio.wait_for(coro, 0.05 * hang)
                except asyncio.TimeoutError:
                    return {"class": "disconnected", "tokens": 0}
            return classify(r.status_code, r.headers, r.text, expect_400)
        async with client.stream("POST", url + req["path"], json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return classify(r.status_code, r.headers, r.text, expect_400)
            if expect_400:
                return {"class": "error", "tokens": 0, "why": "a bad request was accepted"}
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return {"class": "answered", "tokens": chunks}
                data = json.loads(line[6:])
                if "error" in data:
                    return {"class": "error", "tokens": chunks, "why": data["error"].get("message", "")[:80]}
                chunks += 1
                if hang is not None and chunks >= hang:
                    return {"class": "disconnected", "tokens": chunks}  # leaving the block closes the stream
            return {"class": "broken", "tokens": chunks}
    except (httpx.HTTPError, OSError) as e:  # includes a stream cut by the server
        return {"class": "broken" if stream else "error", "tokens": 0, "why": type(e).__name__}


def classify(status: int, headers, text: str, expect_400: bool) -> dict:
    if status == 200 and not expect_400:
        try:
            data = json.loads(text)
            return {"class": "answered", "tokens": data["usage"]["completion_tokens"]}
        except (ValueError, KeyError, TypeError):
            return {"class": "error", "tokens": 0, "why": "a malformed 200 body"}
    if status == 429 and headers.get("retry-after"):
        return {"class": "refused", "tokens": 0, "status": 429, "retry_after": headers.get("retry-after")}
    if expect_400 and status in (400, 413):
        try:
            json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return {"class": "error", "tokens": 0, "why": f"{status} without an OpenAI error body"}
        return {"class": "refused", "tokens": 0, "status": status}
    return {"class": "error", "tokens": 0, "why": f"HTTP {status}: {text[:80]}"}


async def run_load(url: str, reqs: list[dict], clients: int, deadline: float) -> list[dict]:
    """Send ``reqs`` from ``clients`` concurrent clients; stop taking new ones after ``deadline``."""
    import httpx2 as httpx

    todo = list(enumerate(reqs))
    out: list[dict] = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            while todo and time.monotonic() < deadline:
                i, req = todo.pop(0)
                t0 = time.monotonic()
                res = await one(client, url, req)
                wait = res.pop("retry_after", None)
                out.append({"i": i, "seconds": time.monotonic() - t0, "stream": req["body"]["stream"], **res})
                if wait is not None:  # a well-behaved client waits as told before its next request
                    await asyncio.sleep(min(float(wait), 5.0))

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return out


def metrics(url: str) -> dict[str, float]:
    import httpx2 as httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^llmcourse_(queue_depth|batch_size|free_slots) (\S+)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500, help="requests after the warm-up (default: 500)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20 requests, 8 warm-up (default: off)")
    ap.add_argument("--warmup", type=int, default=24, help="warm-up requests before the first RSS reading "
                    "(default: 24)")
    ap.add_argument("--clients", type=int, default=14, help="concurrent clients (default: 14; more than "
                    "--max-batch + --max-queue, so some get 429)")
    ap.add_argument("--max-batch", type=int, default=8, help="server slots (default: 8)")
    ap.add_argument("--max-queue", type=int, default=4, help="server queue (default: 4)")
    ap.add_argument("--ctx", type=int, default=1024, help="server context (default: 1024)")
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of clients that hang up (default: 0.1)")
    ap.add_argument("--threads", type=int, default=2, help="server threads (default: 2)")
    ap.add_argument("--model", default="default", help="model to serve (default: default)")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds of load at most, warm-up "
                    "excluded (default: 600)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the request mix (default: 0)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.warmup = 20, 8
    rng = random.Random(args.seed)
    warm = [draw(rng, 0.0) for _ in range(args.warmup)]
    for i, w in enumerate(warm[:3]):  # the warm-up sees a long prompt and both paths
        w.update(kind="ok", hang_up_after=None, path="/v1/completions")
        w["body"] = {"prompt": PARAGRAPH * 6, "max_tokens": 16, "temperature": 0, "stream": i % 2 == 0}
    reqs = [draw(rng, args.disconnect) for _ in range(args.requests)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcourse", "serve", "--model", args.model, "--port", str(port), "--max-batch",
         str(args.max_batch), "--max-queue", str(args.max_queue), "--ctx", str(args.ctx), "--threads",
         str(args.threads), "--timeout", "300"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []
    try:
        t_start = time.monotonic()
        wait_healthy(url, proc, 900, "/health")
        startup = time.monotonic() - t_start
        asyncio.run(run_load(url, warm, min(args.clients, args.max_batch), time.monotonic() + 600))
        rss_warm = rss_mib(proc.pid)
        t0 = time.monotonic()

        async def load_and_sample() -> list[dict]:
            async def sampler() -> None:
                while True:
                    samples.append((time.monotonic() - t0, rss_mib(proc.pid)))
                    await asyncio.sleep(1.0)

            task = asyncio.create_task(sampler())
            try:
                return await run_load(url, reqs, args.clients, t0 + args.time_limit)
            finally:
                task.cancel()

        results = asyncio.run(load_and_sample())
        wall = time.monotonic() - t0
        time.sleep(1.0)  # the last cancelled requests free their slots at the next step boundary
        idle = metrics(url)
        rss_end = rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    counts = {c: sum(r["class"] == c for r in results) for c in CLASSES}
    why: dict[str, int] = {}
    for r in results:
        if r["class"] in ("error", "broken"):
            why[r.get("why", r["class"])] = why.get(r.get("why", r["class"]), 0) + 1
    growth = (rss_end - rss_warm) / rss_warm
    rss_max = max([s[1] for s in samples] + [rss_end])
    idle_ok = idle.get("queue_depth") == 0 and idle.get("batch_size") == 0 and idle.get("free_slots") == args.max_batch
    row = {"requests sent": len(results), "of": args.requests, **counts,
           "tokens": sum(r["tokens"] for r in results), "wall s": round(wall),
           "RSS after warm-up MiB": round(rss_warm), "RSS end MiB": round(rss_end), "RSS max MiB": round(rss_max),
           "RSS change": f"{growth:+.1%}"}
    print(row, file=sys.stderr)
    refused = [r.get("status") for r in results if r["class"] == "refused"]
    verdict = ("PASS" if counts["error"] == 0 and counts["broken"] == 0 and abs(growth) <= 0.10 and idle_ok and alive
               and len(results) == args.requests else "FAIL")
    notes = [f"{verdict}: {len(results)} of {args.requests} requests sent in {wall:.0f} s "
             f"({args.clients} clients, --max-batch {args.max_batch}, --max-queue {args.max_queue}, --ctx {args.ctx}, "
             f"{args.threads} threads, model {args.model}, seed {args.seed}); server start {startup:.0f} s, "
             f"{args.warmup} warm-up requests before the first RSS reading.",
             f"Refused cleanly: {refused.count(429)} x 429 (with Retry-After), "
             f"{sum(s in (400, 413) for s in refused)} x 400/413 for the malformed or too-long requests.",
             f"Resident memory {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end ({growth:+.1%}; "
             f"target within 10%), {rss_max:.0f} MiB at most.",
             f"After the load: queue depth {idle.get('queue_depth', 0):.0f}, batch size {idle.get('batch_size', 0):.0f}, "
             f"free slots {idle.get('free_slots', 0):.0f} of {args.max_batch}; server {'alive' if alive else 'DEAD'}."]
    if why:
        notes.append("Errors / broken streams: " + ", ".join(f"{k} x{v}" for k, v in sorted(why.items())))
    if args.quick:
        notes.append("A smoke run (--quick): the figures say the script works, not how the server holds up.")
    write_result("serve_soak", "Serving soak run (mixed requests, disconnects, a full queue)", md_table([row]),
                 "\n".join(f"- {n}" for n in notes))
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
