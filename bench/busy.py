"""Speed with one core kept busy by another program, as on a user's laptop (issue 15).

Runs the real commands as a user would (`llmcourse generate` for decode tok/s, `llmcourse eval perplexity`
for scored tok/s) on a quiet machine and with a competing CPU-bound process (a busy loop) on one core, with
the default thread choice (the cores idle at start) and with `--threads` equal to the core count (what every
command used before: it collapsed). Reports the tokens/s of each and the busy/quiet ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import md_table, write_result

EXE = str(Path(sys.executable).with_name("llmcourse"))
GEN = ["generate", "--prompt", "The history of the city of Paris", "--max-new-tokens", "64", "--json"]
PPL = ["eval", "perplexity", "--max-tokens", "1536", "--max-length", "512", "--stride", "256", "--json"]


def run(args: list[str], timeout: float) -> dict | None:
    try:
        r = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as collapsed")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rows = []
    quiet: dict[str, float] = {}
    for load in ("quiet", "one core busy"):
        for threads in ("auto", str(cores)):
            extra = [] if threads == "auto" else ["--threads", threads]
            for name, cmd in (("decode tok/s", GEN), ("perplexity tok/s", PPL)):
                tps, used = [], None
                for _ in range(args.runs):
                    hog = busy() if load != "quiet" else None
                    try:
                        time.sleep(0.5 if hog else 0)
                        out = run([*cmd, *extra], args.timeout)
                    finally:
                        if hog:
                            hog.kill()
                            hog.wait()
                    if out is None:
                        tps.append(0.0)
                        continue
                    used = out.get("threads")
                    tps.append(float(out["tokens_per_second"]))
                med = statistics.median(tps)
                key = f"{name} {threads}"
                if load == "quiet":
                    quiet[key] = med
                rows.append({"load": load, "threads": f"{threads} ({used})" if threads == "auto" else threads,
                             "measure": name, "tokens/s": med,
                             "vs quiet": med / quiet[key] if quiet.get(key) else 1.0})
                print(rows[-1], file=sys.stderr, flush=True)
    notes = ("`auto` picks the cores idle when the command starts (shown in brackets); a run over "
             f"{args.timeout:.0f} s counts as 0. Median of {args.runs} runs per cell; whole processes, so loading "
             "is outside the tokens/s but inside the timeout.")
    write_result("busy", "Speed with one core busy (bench/busy.py)", md_table(rows), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
