"""Benchmark of the 8-bit lab on the default model (SmolLM2-135M-Instruct), against fp32.

1. Decoding speed: greedy decoding of --new-tokens tokens through the decoding lab's engine
   (``llmcourse.decoding.generate``, fast Llama backend, and transformers as a second engine), fp32 vs
   weight-only int8 (absmax per row) and the other schemes; the models take turns within each of
   --repeats rounds, and the table shows medians. Target: int8 >= 1.5x fp32, same engine, same run.
2. Quality and size: for each method, bytes on disk and in memory, perplexity on the first
   --ppl-tokens tokens of the eval split (core ``perplexity``, window 1024 / stride 512), KL and top-1
   agreement vs fp32 (core ``compare``) on the first --cmp-tokens tokens.

Run: ``.venv/bin/python bench/int8.py`` (writes bench/results/int8.md). Timings on a shared 2-core
CPU are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from llmcourse.core.data import load_text, tokenize_stream  # noqa: E402
from llmcourse.core.models import load_model  # noqa: E402
from llmcourse.quant.int8 import Int8Config, quantize_model  # noqa: E402
from llmcourse.quant.int8.tour import FULL_METHODS, measure  # noqa: E402


def _machine() -> str:
    """bench/common.py's machine description."""
    from common import machine

    return machine()


PROMPT = "The history of the Roman Empire"


def decode_bench(models: dict[str, torch.nn.Module], tokenizer, new_tokens: int, repeats: int,
                 runs: list[tuple[str, str]], threads: int) -> list[dict]:
    """Median greedy tokens/s of each (engine, model) in ``runs``, interleaved within each round."""
    from llmcourse.decoding import GenerationConfig, generate

    torch.set_num_threads(threads)
    times: dict[tuple[str, str], list[float]] = {}
    for backend, name in runs:  # warm-up: compile the int8 kernels, build the fast forward
        generate(models[name], tokenizer, PROMPT, GenerationConfig(max_new_tokens=4, eos_token_ids=(), backend=backend))
    for r in range(repeats):
        for backend, name in runs:
            cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(), backend=backend)
            out = generate(models[name], tokenizer, PROMPT, cfg)
            times.setdefault((backend, name), []).append(out.tokens_per_second)
            print(f"  {threads} thr round {r + 1} {backend:4} {name:28} {out.tokens_per_second:6.1f} tok/s",
                  file=sys.stderr)
    rows = []
    for backend, name in runs:
        med = statistics.median(times[(backend, name)])
        base = statistics.median(times[(backend, "fp32")])
        rows.append({"threads": threads, "engine": backend, "model": name, "tok_s": med, "vs_fp32": med / base,
                     "runs": ", ".join(f"{t:.1f}" for t in times[(backend, name)])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per greedy decode (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the decode benchmark (default 5)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="eval tokens for perplexity (default 4096)")
    ap.add_argument("--cmp-tokens", type=int, default=1024, help="eval tokens for KL / top-1 (default 1024)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to decode with (default 1,2)")
    ap.add_argument("--skip-quality", action="store_true", help="only the decode benchmark")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.md"), help="markdown output")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    lm = load_model("default")
    models = {"fp32": lm.model}
    for cfg in [Int8Config("absmax", "row"), Int8Config("zeropoint", "row"), Int8Config("llm.int8")]:
        m = copy.deepcopy(lm.model)
        quantize_model(m, cfg)
        models[f"int8 {cfg.name}"] = m
    names = list(models)
    runs = [("fast", n) for n in names] + [("hf", n) for n in names[:2]]
    dec = []
    for th in [int(t) for t in args.threads.split(",")]:
        # more threads: only the headline pair (on a loaded 2-core machine each run can take a minute)
        dec += decode_bench(models, lm.tokenizer, args.new_tokens, args.repeats, runs if th == 1 else runs[:2], th)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lines = [
        "# 8-bit quantization (bench/int8.py)",
        "",
        f"Default model (SmolLM2-135M-Instruct) on {_machine()}; a shared virtual machine: absolute speeds are "
        "noisy, ratios are within one run.",
        "",
        f"## Greedy decoding, {args.new_tokens} new tokens, median of {args.repeats} interleaved runs",
        "",
        "Engines: `fast` is the decoding lab's Llama forward (`llmcourse.decoding.generate`, static KV cache; "
        "its compiled decode step for fp32 and the weight-only int8 rows, which it de-quantizes inside the "
        "products, and its eager path for LLM.int8()), "
        "`hf` its transformers backend (`model(...)` with HF's KV cache). int8 rows are weight-only int8 "
        "(`Int8Linear`) except LLM.int8(), which also quantizes activations.",
        "",
        "| threads | engine | model | tok/s (median) | vs fp32, same engine | runs |",
        "|---:|---|---|---:|---:|---|",
    ]
    for r in dec:
        lines.append(f"| {r['threads']} | {r['engine']} | {r['model']} | {r['tok_s']:.1f} | {r['vs_fp32']:.2f}x | "
                     f"{r['runs']} |")
    if not args.skip_quality:
        ids = tokenize_stream(lm.tokenizer, load_text("default", "eval"))
        rows = [measure(lm, None, ids, args.ppl_tokens, args.cmp_tokens, 0)[0]]
        for cfg in FULL_METHODS:
            rows.append(measure(lm, cfg, ids, args.ppl_tokens, args.cmp_tokens, 0)[0])
            print(f"  {rows[-1]['method']}: ppl {rows[-1]['perplexity']:.4f}", file=sys.stderr)
        ref = rows[0]["perplexity"]
        lines += [
            "",
            f"## Size and quality: perplexity on the first {min(args.ppl_tokens, ids.shape[1])} tokens of the eval "
            f"split, KL / top-1 vs fp32 on the first {args.cmp_tokens}",
            "",
            "| method | bytes on disk | bytes in memory | quantized weights / fp32 | perplexity | vs fp32 | "
            "KL(fp32 ‖ method) | top-1 vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            disk = "" if r["bytes_on_disk"] is None else f"{r['bytes_on_disk']:,}"
            lines.append(f"| {r['method']} | {disk} | {r['bytes_in_memory']:,} | {r['weights_vs_fp32']:.4f} | "
                         f"{r['perplexity']:.4f} | {100 * (r['perplexity'] / ref - 1):+.2f}% | "
                         f"{r['kl_vs_fp32']:.5f} | {r['top1_vs_fp32']:.4f} |")
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s. Command: `.venv/bin/python bench/int8.py "
              + " ".join(sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    from llmcourse.core.io import write_text

    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
