"""Serving under load: `llmcourse serve` vs llama.cpp's own C++ `llama-server`, on the same GGUF file.

The stronger serving anchor (issue 26): ``llama-server`` with parallel slots (``-np``, the most clients)
and continuous batching (``-cb``), built by ``bench/llama_server.py`` from the llama.cpp vendored in the
``llama-cpp-python==0.3.36`` sdist and cached in ``~/.cache/llmcourse/llama-server/0.3.36/``.
(``bench/serve.py`` measures ``llama_cpp.server``, which answers one request at a time.)

One run:

1. writes a GGUF of ``--source`` (default: the default model, SmolLM2-135M-Instruct) with our GGUF lab:
   ``llmcourse quantize gguf --type Q8_0`` for ``--format q8_0`` (default), ``llmcourse convert gguf
   --dtype f32`` for ``--format f32`` (or takes ``--gguf FILE``);
2. starts both servers on free ports of 127.0.0.1 with the same threads: ours loads ``--model`` (default: that
   very GGUF file; an HF folder such as ``default`` compares our fp32 weights, a fair pair with ``--format f32``)
   with ``--max-batch`` = the most clients and ``--ctx``; llama-server gets ``-np`` = the most clients, ``-cb``,
   ``-c`` = ``--ctx`` per slot (x ``-np``), ``-t``/``-tb`` = ``--threads``, its other defaults (f16 KV cache,
   flash attention auto, prompt cache on);
3. waits until each is ready (``/health`` 200; ours also ``"status": "ok"``, every step bucket compiled);
4. ``--rounds`` times, for each client count (default 1 and 8), drives each server in turn (the order alternates
   between rounds) with that many concurrent streaming clients of the official ``openai`` package: each client
   sends ``--requests`` chat requests one after the other (same questions, ``temperature 0`` = greedy,
   ``max_tokens``, ``stream_options.include_usage``), and stops early after ``--time-limit`` s of its row.

Reported per round and server: aggregate completion tokens/s (the servers' ``usage.completion_tokens``, else
content chunks, over the row's wall time) and time to first token (request sent -> first content chunk)
p50 / p95, errors and broken streams. The summary takes, per server and client count, the median tokens/s over
the rounds and the TTFT percentiles over all the rounds' requests, and the ratios ours / llama-server, with
the targets: >= 1.0x at the most clients, >= 0.8x at 1, p95 TTFT no worse (at each count).

    .venv/bin/python bench/serve_llama_server.py                          # Q8_0, 1 and 8 clients, 3 rounds
    .venv/bin/python bench/serve_llama_server.py --format f32 --model default   # our fp32 folder vs F32 GGUF
    .venv/bin/python bench/serve_llama_server.py --quick                  # smoke: 1 and 2 clients, 8 tokens

Both servers are killed at exit, also on Ctrl-C or SIGTERM; if llama-server cannot be built or a server does
not start, the run stops with one line on stderr (exit 2). Writes ``bench/results/serve_llama_server.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import md_table, write_result  # noqa: E402
from llama_server import VERSION, BuildError, ensure  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three uses of a paperclip.", "Why is the sky blue?", "Tell me about elephants.",
             "How do plants make food?", "What is a prime number?"]
OURS, THEIRS = "llmcourse serve", "llama-server"


class BenchError(Exception):
    """The run cannot go on; the message is one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path, n: int = 1) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class Server:
    """A server subprocess (its own session, so that the terminal's Ctrl-C reaches only this script, which
    then stops it), its log file and its base URL."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.name, self.cmd, self.log = name, cmd, log
        self.url = f"http://127.0.0.1:{port}"
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float, need_warm: bool) -> float:
        """Poll ``/health`` until 200 (and ``"status": "ok"`` when ``need_warm``); returns the seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} while starting: "
                                 f"{_log_tail(self.log) or 'no output'} (command: {' '.join(self.cmd)})")
            try:  # urllib raises HTTPError for 503 (llama-server while it loads the model)
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200 and (not need_warm or json.loads(r.read()).get("status") == "ok"):
                        return time.monotonic() - t0
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        raise BenchError(f"{self.name} was not ready after {timeout:.0f} s: {_log_tail(self.log) or 'no output'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass


async def one_request(client, question: str, max_tokens: int) -> dict:
    """One streaming chat request -> its time to first token, tokens, and whether it failed."""
    import openai

    t0 = time.perf_counter()
    ttft, chunks, usage, prompt, finished = None, 0, None, None, False
    try:
        stream = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if c.finish_reason is not None:
                    finished = True
    except openai.APIStatusError:
        return {"ttft": None, "tokens": 0, "chunks": 0, "prompt": None, "error": True, "broken": False}
    except Exception as e:  # a dropped connection or a stream cut short (httpx's errors are not wrapped mid-stream)
        return {"ttft": ttft, "tokens": chunks, "chunks": chunks, "prompt": None, "error": False, "broken": True,
                "why": type(e).__name__}
    return {"ttft": ttft, "tokens": usage if usage is not None else chunks, "chunks": chunks, "prompt": prompt,
            "error": False, "broken": not finished, "why": None if finished else "no finish_reason"}


async def load(url: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    """``clients`` concurrent clients, each sending ``requests`` requests in turn -> the row's figures."""
    import openai

    results: list[dict] = []
    t0 = time.perf_counter()

    async def client_loop(i: int) -> None:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            for j in range(requests):
                if time.perf_counter() - t0 > time_limit:
                    return
                results.append(await one_request(client, QUESTIONS[(i + j) % len(QUESTIONS)], max_tokens))

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "chunks": sum(r["chunks"] for r in results), "wall": wall,
            "prompt": sum(r["prompt"] or 0 for r in results) / max(1, sum(r["prompt"] is not None for r in results)),
            "ttfts": [r["ttft"] for r in results if r["ttft"] is not None],
            "errors": sum(r["error"] for r in results), "broken": sum(r["broken"] for r in results),
            "why": sorted({r["why"] for r in results if r.get("why")})}


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank), NaN if empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start_profile(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    """``py-spy record`` of our server (all threads, without pausing it) as collapsed stacks into ``out``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking",
                                 "--rate", "50", "--duration", str(int(seconds) + 5), "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        raise BenchError(f"cannot run py-spy ({e}): pip install py-spy, or drop --profile") from None


def stop_profile(spy: subprocess.Popen, out: Path) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes what it has sampled so far
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
    print(f"py-spy profile of our server: {out}", file=sys.stderr)


def make_gguf(source: str, fmt: str, tmp: Path, env: dict[str, str]) -> Path:
    """Our GGUF lab's file of ``source``: Q8_0 (``quantize gguf``) or F32 (``convert gguf``)."""
    cli = [sys.executable, "-m", "llmcourse"]
    if fmt == "q8_0":
        out = tmp / "gguf"
        cmd = [*cli, "quantize", "gguf", "--model", source, "--type", "Q8_0", "--out", str(out)]
    else:
        out = tmp / "model-F32.gguf"
        cmd = [*cli, "convert", "gguf", "--model", source, "--dtype", "f32", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"`{' '.join(cmd[2:])}` failed: {last}")
    files = sorted(out.glob("*.gguf")) if out.is_dir() else [out]
    if not files:
        raise BenchError(f"`{' '.join(cmd[2:])}` wrote no .gguf")
    return files[0]


def run(args: argparse.Namespace, clients: list[int], tmp: Path, servers: list[Server]) -> tuple[list, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("OMP_WAIT_POLICY", None)
    try:
        exe = ensure(VERSION, args.jobs)
    except BuildError as e:
        raise BenchError(f"cannot build llama-server ({e}); build it alone with `python bench/llama_server.py`") \
            from None
    gguf = Path(args.gguf) if args.gguf else make_gguf(args.source, args.format, tmp, env)
    if not gguf.is_file():
        raise BenchError(f"--gguf {gguf} does not exist")
    ours_model = args.model or str(gguf)
    width = max(clients)
    t0 = time.monotonic()
    port = free_port()
    ours = Server(OURS, [sys.executable, "-m", "llmcourse", "serve", "--model", ours_model, "--port", str(port),
                         "--max-batch", str(width), "--ctx", str(args.ctx), "--threads", str(args.threads)],
                  port, tmp / "ours.log", env)
    servers.append(ours)
    ready = {OURS: ours.wait_ready(args.start_timeout, need_warm=True)}
    port = free_port()
    theirs = Server(THEIRS, [str(exe), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(width), "-cb", "-c", str(args.ctx * width), "-t", str(args.threads),
                             "-tb", str(args.threads), "--no-webui"], port, tmp / "theirs.log", env)
    servers.append(theirs)
    ready[THEIRS] = theirs.wait_ready(args.start_timeout, need_warm=False)
    print(f"ready: ours in {ready[OURS]:.0f} s, llama-server in {ready[THEIRS]:.0f} s "
          f"({time.monotonic() - t0:.0f} s); model {ours_model} vs {gguf.name}", file=sys.stderr)
    rows = []
    pair = [ours, theirs]
    for rnd in range(args.rounds):
        for k, n in enumerate(clients):
            order = pair if (rnd + k) % 2 == 0 else pair[::-1]
            for srv in order:
                if srv.proc.poll() is not None:
                    raise BenchError(f"{srv.name} died (exit {srv.proc.returncode}): {_log_tail(srv.log)}")
                asyncio.run(load(srv.url, 1, 1, 8, 60))  # warm-up: one short request
                spy = None
                if args.profile and srv is ours and rnd == 0 and n == width:
                    spy = start_profile(ours.proc.pid, Path(args.profile), args.time_limit)
                r = asyncio.run(load(srv.url, n, args.requests, args.max_tokens, args.time_limit))
                if spy is not None:
                    stop_profile(spy, Path(args.profile))
                rows.append({"round": rnd + 1, "server": srv.name, "clients": n, **r})
                print(f"round {rnd + 1}, {n} clients, {srv.name}: {r['tokens'] / r['wall']:.1f} tok/s, "
                      f"TTFT p50 {pct(r['ttfts'], 0.5):.3f} s p95 {pct(r['ttfts'], 0.95):.3f} s, "
                      f"{r['errors']} errors, {r['broken']} broken", file=sys.stderr)
    return rows, {"gguf": gguf.name, "ours_model": args.model or "the same file", "ready": ready}


def summarise(rows: list[dict], clients: list[int]) -> tuple[list[dict], list[dict], list[str]]:
    per_round = [{"round": r["round"], "server": r["server"], "clients": r["clients"], "requests": r["requests"],
                  "prompt tokens (mean)": r["prompt"], "tokens": r["tokens"], "tok/s": r["tokens"] / r["wall"], "ttft p50 s": pct(r["ttfts"], 0.5),
                  "ttft p95 s": pct(r["ttfts"], 0.95), "errors": r["errors"], "broken": r["broken"]} for r in rows]
    summary, notes = [], []
    for n in clients:
        got = {}
        for name in (OURS, THEIRS):
            mine = [r for r in rows if r["server"] == name and r["clients"] == n]
            ttfts = [t for r in mine for t in r["ttfts"]]
            got[name] = {"server": name, "clients": n, "rounds": len(mine),
                         "tok/s (median)": statistics.median(r["tokens"] / r["wall"] for r in mine),
                         "ttft p50 s": pct(ttfts, 0.5), "ttft p95 s": pct(ttfts, 0.95),
                         "errors + broken": sum(r["errors"] + r["broken"] for r in mine)}
            summary.append(got[name])
        a, b = got[OURS], got[THEIRS]
        ratio = a["tok/s (median)"] / b["tok/s (median)"] if b["tok/s (median)"] > 0 else float("nan")
        ours_r = [r for r in rows if r["server"] == OURS and r["clients"] == n]
        theirs_r = [r for r in rows if r["server"] == THEIRS and r["clients"] == n]
        round_ratios = [x["tokens"] / x["wall"] / (y["tokens"] / y["wall"])
                        for x, y in zip(ours_r, theirs_r, strict=True) if y["tokens"] > 0]
        need = 1.0 if n == max(clients) and n > 1 else 0.8 if n == 1 else None
        ttft_ok = a["ttft p95 s"] <= b["ttft p95 s"]
        target = "no target" if need is None else (
            f"target >= {need:.1f}x: {'met' if ratio >= need else 'NOT met'}; p95 TTFT no worse: "
            f"{'met' if ttft_ok else 'NOT met'}")
        notes.append(f"{n} client{'s' * (n > 1)}: ours / llama-server tokens/s = {ratio:.2f}x (per round: "
                     f"{', '.join(f'{x:.2f}' for x in round_ratios)}); TTFT p50 {a['ttft p50 s']:.3f} vs "
                     f"{b['ttft p50 s']:.3f} s, p95 {a['ttft p95 s']:.3f} vs {b['ttft p95 s']:.3f} s ({target})")
    return per_round, summary, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=["q8_0", "f32"], default="q8_0",
                    help="the GGUF both serve (ours unless --model): Q8_0 or F32. Default: %(default)s")
    ap.add_argument("--source", default="default", help="the model the GGUF is written from (default: %(default)s)")
    ap.add_argument("--gguf", default=None, help="serve this GGUF file instead of writing one (--format is ignored)")
    ap.add_argument("--model", default=None, help="what our server loads (default: the same GGUF file; e.g. "
                    "'default' or an HF folder for our fp32 weights)")
    ap.add_argument("--clients", default="1,8", help="concurrent clients per row (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per row (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence / slot (default: %(default)s)")
    ap.add_argument("--time-limit", type=float, default=40, help="seconds per row at most: clients send no new "
                    "request after it (default: %(default)s)")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds each server may take to be ready "
                    "(ours compiles its step buckets first; default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="compile jobs if llama-server must be built (default: 2)")
    ap.add_argument("--profile", default=None, metavar="FILE", help="record our server with py-spy during the "
                    "first round's row with the most clients, as collapsed stacks (py-spy --format raw) into FILE")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --clients 1,2 --rounds 1 --requests 1 "
                    "--max-tokens 8")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds, args.requests, args.max_tokens, args.time_limit = "1,2", 1, 1, 8, 20
    clients = sorted({int(c) for c in args.clients.split(",")})
    if not clients or min(clients) < 1 or args.rounds < 1 or args.requests < 1:
        print("error: --clients, --rounds and --requests must be positive", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    servers: list[Server] = []
    started = time.strftime("%H:%M UTC", time.gmtime())
    try:
        with tempfile.TemporaryDirectory(prefix="serve-llama-server-") as tmp:
            try:
                rows, info = run(args, clients, Path(tmp), servers)
            finally:
                for s in servers:
                    s.stop()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: both servers stopped", file=sys.stderr)
        return 130
    per_round, summary, notes = summarise(rows, clients)
    bad = sum(r["errors"] + r["broken"] for r in rows if r["server"] == OURS)
    notes.append(f"llmcourse serve: {bad} errors + broken streams (target 0)")
    for name in (OURS, THEIRS):
        why = sorted({w for r in rows if r["server"] == name for w in r["why"]})
        if why:
            notes.append(f"{name}: broken streams ended with: {', '.join(why)}")
    cmd = "bench/serve_llama_server.py " + " ".join(sys.argv[1:])
    write_result(
        "serve_llama_server", f"Serving: llmcourse serve vs llama.cpp's llama-server ({args.format.upper()} GGUF)",
        md_table(summary) + "\n\nPer round:\n\n" + md_table(per_round),
        f"Both on `{info['gguf']}` (written by our GGUF lab from `{args.source}`"
        f"{', given' if args.gguf else ''}); ours loads `{info['ours_model']}`. llama-server {VERSION} "
        f"(llama-cpp-python's vendored llama.cpp, built by bench/llama_server.py) with -np {max(clients)} -cb "
        f"-c {args.ctx * max(clients)}; ours --max-batch {max(clients)} --ctx {args.ctx}; {args.threads} thread(s) per "
        f"server (the header's thread count is this script's). "
        f"{args.rounds} interleaved rounds; per row each client sends {args.requests} requests (none after "
        f"{args.time_limit:.0f} s), max_tokens {args.max_tokens}, greedy, streaming (openai client). "
        f"tok/s: median over rounds; TTFT: over all rounds' requests. Started {started}; "
        f"ready after {info['ready'][OURS]:.0f} s (ours) / {info['ready'][THEIRS]:.0f} s (llama-server)."
        + (" A smoke run (--quick): the figures are not a measurement." if args.quick else "")
        + f"\n\nCommand: `.venv/bin/python {cmd.strip()}`\n\n" + "\n".join(f"- {n}" for n in notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
