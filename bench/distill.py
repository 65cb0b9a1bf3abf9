"""Distillation throughput and memory: tokens/s and peak RSS of ``llmcourse distill`` on the default model.

The student is the default model with 8 of its 30 layers dropped (``--drop-layers 8``); each configuration
runs in its own process (its peak RSS includes loading the teacher and the student) for ``--steps``
optimizer steps of ``--batch-size`` windows of ``--seq-len`` tokens. Reported: the median tokens/s of
the steps after the first (``metrics.jsonl``), and the process's peak RSS. The anchor is the same student
trained on the plain LM loss (``--loss lm``, no teacher forward), i.e. what the teacher costs.

Run: ``.venv/bin/python bench/distill.py [--steps 4] [--configs forward-full,lm-full,forward-lora]``.

``--curves OUT1 OUT2 ...`` instead prints the held-out curves of finished ``llmcourse distill`` runs side by
side (perplexity and KL to the teacher against training tokens) and draws them into ``--plot FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(config: str, steps: int, batch: int, seq_len: int, threads: int) -> dict:
    loss, method = config.split("-")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        cmd = [sys.executable, "-m", "llmcourse.cli", "distill", "--teacher", "default", "--student-from", "default",
               "--drop-layers", "8", "--loss", loss, "--method", method, "--tokens", str(steps * batch * seq_len),
               "--batch-size", str(batch), "--seq-len", str(seq_len), "--eval-every", "0", "--eval-windows", "1",
               "--threads", str(threads), "--out", str(out), "--json"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "LLMCOURSE_PROGRESS": "0"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{config} failed: {proc.stderr.read().decode()[-800:]}")
        peak = usage.ru_maxrss
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {"config": config, "tokens_per_s": statistics.median(speeds) if speeds else None, "steps": steps,
            "peak_rss_gb": peak * 1024 / 1e9, "wall_s": wall}


def curves(dirs: list[str], plot: str | None) -> None:
    """The held-out measurements of finished runs, as one markdown table (and a PNG with ``plot``)."""
    runs = {}
    for d in dirs:
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        runs[Path(d).name] = rows
    names = list(runs)
    print("| tokens | " + " | ".join(f"{n}: perplexity | {n}: KL to teacher | {n}: top-1" for n in names) + " |")
    print("|---:|" + "---:|" * (3 * len(names)))
    steps = sorted({r["tokens"] for rows in runs.values() for r in rows if "eval_perplexity" in r})
    for t in steps:
        cells = []
        for n in names:
            r = next((r for r in runs[n] if r["tokens"] == t and "eval_perplexity" in r), None)
            cells += [f"{r['eval_perplexity']:.2f}", f"{r['eval_kl']:.3f}", f"{r['eval_top1']:.3f}"] if r else ["-"] * 3
        print(f"| {t:,} | " + " | ".join(cells) + " |")
    if plot:
        from llmcourse.compress import plot_curves

        plot_curves(runs, plot, "a quarter of the layers dropped: distillation vs the plain LM loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default="forward-full,lm-full,forward-lora")
    ap.add_argument("--curves", nargs="+", default=None, help="print the curves of these distill --out folders")
    ap.add_argument("--plot", default=None, help="with --curves: draw them into this PNG")
    args = ap.parse_args()
    if args.curves:
        curves(args.curves, args.plot)
        return
    print("| run | tokens/s (median of steps 2..) | peak RSS GB | wall s |")
    print("|---|---:|---:|---:|")
    for c in args.configs.split(","):
        r = run(c, args.steps, args.batch_size, args.seq_len, args.threads)
        print(f"| {c} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
