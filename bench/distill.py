"""Distillation throughput and memory: tokens/s and peak RSS of ``llmcourse distill`` on the default model.

The student is the default model with 8 of its 30 layers dropped (``--drop-layers 8``); each configuration
runs in its own process (its peak RSS includes loading the teacher and the student) for ``--steps``
optimizer steps of ``--batch-size`` windows of ``--seq-len`` tokens. Reported: the median tokens/s of
the steps after the first (``metrics.jsonl``), and the process's peak RSS. The anchor is the same student
trained on the plain LM loss (``--loss lm``, no teacher forward), i.e. what the teacher costs.

Run: ``.venv/bin/python bench/distill.py [--steps 4] [--configs forward-full,lm-full,forward-lora]``.

``--curves OUT1 OUT2 ...`` instead prints the held-out curves of finished ``llmcourse distill`` runs side by
side (perplexity and KL to the teacher against training tokens) and draws them into ``--plot FILE``.

``--compare`` is the acceptance experiment: the same student (``--drop-layers 8`` by ``--drop-criterion``)
trained by each of ``--runs`` (default: forward KL alone, forward KL averaged with the LM loss, and the plain
LM loss), one process after the other, with the same windows, token budget, optimizer and schedule; it
prints each run's tokens/s and peak RSS, the curves, and the final per-window differences against the last
run (the LM baseline) with their standard error (``paired_gap``: the held-out windows are the same for every run). Example::

    .venv/bin/python bench/distill.py --compare --tokens 8192 --batch-size 4 --seq-len 256 --lr 2e-4 \\
        --warmup-ratio 0 --eval-every 4 --eval-windows 16 --threads 1 --keep out/compare --plot curves.png

(the defaults of ``--compare``'s flags are that measurement's, docs/compression.md).
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


def run_compare(name: str, flags: list[str], common: list[str], out: Path, threads: int) -> dict:
    """One ``llmcourse distill`` run of the comparison, in its own process: (tokens/s, peak RSS, wall)."""
    cmd = [sys.executable, "-m", "llmcourse.cli", "distill", "--teacher", "default", "--student-from", "default",
           *common, *flags, "--threads", str(threads), "--out", str(out), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "LLMCOURSE_PROGRESS": "0"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.read().decode()[-800:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {"run": name, "tokens_per_s": statistics.median(speeds) if speeds else None,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "wall_s": wall}


def criteria(eval_windows: int, seq_len: int, samples: int) -> None:
    """The starting student of each layer-choice criterion (8 of 30 layers): which layers, held-out perplexity
    and KL to the teacher before any training, on the windows ``--compare`` evaluates on."""
    import copy

    from llmcourse.compress import (
        block_distances,
        choose_block,
        choose_layers,
        drop_layers,
        layer_similarities,
        measure,
        token_windows,
    )
    from llmcourse.core.data import calibration_windows
    from llmcourse.core.models import load_model

    lm = load_model("default")
    cal = calibration_windows(lm.tokenizer, samples, 256, seed=0)  # what distill --samples 16 uses
    held = token_windows(lm.tokenizer, "default", "eval", seq_len)[:eval_windows]
    print(f"| criterion | dropped layers | perplexity | KL to teacher | top-1 | ({eval_windows} x {seq_len} tokens)")
    print("|---|---|---:|---:|---:|")
    t = measure(lm.model, lm.model, held)
    print(f"| none (teacher) | | {t['eval_perplexity']:.2f} | 0 | 1 |", flush=True)
    for name, choose in (("layer", lambda m: choose_layers(layer_similarities(m, cal), 8)),
                         ("block", lambda m: choose_block(block_distances(m, cal, 8), 8))):
        idx = choose(lm.model)
        student = copy.deepcopy(lm.model)
        drop_layers(student, idx)
        r = measure(student, lm.model, held)
        print(f"| {name} | {idx} | {r['eval_perplexity']:.2f} | {r['eval_kl']:.3f} | {r['eval_top1']:.3f} |",
              flush=True)
        del student


def gaps(dirs: list[str]) -> None:
    """Each run's final held-out NLL and KL minus the last run's: the mean per-window difference ± its
    standard error (the runs score the same windows)."""
    from llmcourse.compress import paired_gap

    finals = {Path(d).name: [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()][-1]
              for d in dirs}
    names = list(finals)
    base = finals[names[-1]]
    n = len(base["eval_window_nll"])
    print(f"\nfinal, per-window differences vs {names[-1]} ({n} windows; mean ± standard error):")
    print("| run | perplexity | KL to teacher | Δ NLL (nats/token) | Δ NLL / se | Δ KL | Δ KL / se |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        f = finals[name]
        if name == names[-1]:
            print(f"| {name} | {f['eval_perplexity']:.3f} | {f['eval_kl']:.4f} | | | | |")
            continue
        dn, sn = paired_gap(f["eval_window_nll"], base["eval_window_nll"])
        dk, sk = paired_gap(f["eval_window_kl"], base["eval_window_kl"])
        print(f"| {name} | {f['eval_perplexity']:.3f} | {f['eval_kl']:.4f} | {dn:+.4f} ± {sn:.4f} | {dn / sn:+.1f} "
              f"| {dk:+.4f} ± {sk:.4f} | {dk / sk:+.1f} |")


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
    ap.add_argument("--plot", default=None, help="with --curves / --compare: draw them into this PNG")
    ap.add_argument("--compare", action="store_true", help="train the same student with each of --runs and compare")
    ap.add_argument("--runs", nargs="+", default=["kd:--loss forward --ce-weight 0",
                                                   "kd-ce:--loss forward --ce-weight 0.5", "lm:--loss lm"],
                    help="NAME:FLAGS of each run (the last one is the baseline of the differences)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--lr", default="2e-4")
    ap.add_argument("--warmup-ratio", default="0")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--drop-criterion", default="layer")
    ap.add_argument("--criteria", action="store_true", help="the starting student of each --drop-criterion")
    ap.add_argument("--keep", default=None, help="with --compare: keep the run folders here (else a temporary one)")
    args = ap.parse_args()
    if args.criteria:
        import torch

        torch.set_num_threads(args.threads)
        criteria(args.eval_windows, args.seq_len, 16)
        return
    if args.curves:
        curves(args.curves, args.plot)
        gaps(args.curves)
        return
    if args.compare:
        common = ["--drop-layers", "8", "--drop-criterion", args.drop_criterion, "--tokens", str(args.tokens),
                  "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", args.lr,
                  "--warmup-ratio", args.warmup_ratio, "--eval-every", str(args.eval_every),
                  "--eval-windows", str(args.eval_windows)]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.keep or tmp)
            root.mkdir(parents=True, exist_ok=True)
            print(f"common flags: {' '.join(common)}")
            print("| run | flags | tokens/s (median of steps 2..) | peak RSS GB | wall s |")
            print("|---|---|---:|---:|---:|")
            dirs = []
            for spec in args.runs:
                name, _, flags = spec.partition(":")
                r = run_compare(name, flags.split(), common, root / name, args.threads)
                dirs.append(str(root / name))
                print(f"| {name} | `{flags}` | {r['tokens_per_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} |",
                      flush=True)
            print()
            curves(dirs, args.plot)
            gaps(dirs)
        return
    print("| run | tokens/s (median of steps 2..) | peak RSS GB | wall s |")
    print("|---|---:|---:|---:|")
    for c in args.configs.split(","):
        r = run(c, args.steps, args.batch_size, args.seq_len, args.threads)
        print(f"| {c} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
