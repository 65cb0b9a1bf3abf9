"""Benchmark of the 8-bit lab on the default model (SmolLM2-135M-Instruct), against fp32.

1. Decoding speed: greedy decoding of --new-tokens tokens through the decoding lab's engine
   (``llmcourse.decoding.generate``, fast Llama backend, and transformers as a second engine), fp32 vs
   weight-only int8 (absmax per row) and the other schemes; the models take turns within each of
   --repeats rounds, and the table shows medians. Target: int8 >= 1.5x fp32, same engine, same run.
2. Quality and size: for each method, bytes on disk and in memory, perplexity on the first
   --ppl-tokens tokens of the eval split (core ``perplexity``, window 1024 / stride 512), KL and top-1
   agreement vs fp32 (core ``compare``) on the first --cmp-tokens tokens.

3. Evaluation time of an LLM.int8() folder: ``llmcourse eval perplexity --model F --max-tokens N`` as a
   process, fp32 then LLM.int8() then again (interleaved), on this CPU and on an emulated CPU without
   VNNI (``torch.backends.mkldnn.enabled = False``: ``torch._int_mm`` then runs ATen's scalar loops, as
   torch does on an AVX2 CPU; ``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
   ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for the rest). Target: LLM.int8() <= 3x fp32. ``--eval-only`` runs
   just this part (into bench/results/int8_eval.md); ``--eval-before-tokens N`` adds the old choice
   (``LLMCOURSE_INT_MM=1``: ``_int_mm`` whenever it is exact) on N tokens.

Run: ``.venv/bin/python bench/int8.py`` (writes bench/results/int8.md). Timings on a shared 2-core
CPU are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


NO_VNNI_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
NO_VNNI_PRELUDE = "import torch; torch.backends.mkldnn.enabled = False; "


def eval_process(model: str, tokens: int, threads: int, no_vnni: bool, extra_env: dict | None = None) -> dict:
    """One ``llmcourse eval perplexity --json`` process: its wall time and its own evaluation seconds."""
    argv = ["eval", "perplexity", "--model", model, "--max-tokens", str(tokens), "--threads", str(threads), "--json"]
    code = (NO_VNNI_PRELUDE if no_vnni else "") + f"import sys; from llmcourse.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, **(NO_VNNI_ENV if no_vnni else {}), **(extra_env or {})}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    data = json.loads(out.stdout)
    return {"wall": wall, "eval": data["seconds"], "perplexity": data["perplexity"]}


def eval_time_bench(tokens: int, threads: int, repeats: int, before_tokens: int) -> list[str]:
    """Section 3: `eval perplexity` of fp32 vs an LLM.int8() folder, native and without VNNI."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = str(Path(d) / "llm-int8")
        subprocess.run([sys.executable, "-m", "llmcourse.cli", "quantize", "int8", "--model", "default", "--method",
                        "llm.int8", "--out", folder, "--threads", str(threads)], check=True, capture_output=True)
        for no_vnni in (False, True):
            res: dict[str, list[dict]] = {"fp32": [], "llm.int8": []}
            for r in range(repeats):
                for name, model in (("fp32", "default"), ("llm.int8", folder)):
                    res[name].append(eval_process(model, tokens, threads, no_vnni))
                    print(f"  eval {'no-VNNI' if no_vnni else 'native'} round {r + 1} {name}: "
                          f"{res[name][-1]['eval']:.1f} s eval, {res[name][-1]['wall']:.1f} s wall", file=sys.stderr)
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall", "eval", "perplexity")}
                   for k, v in res.items()}
            cpu = "emulated AVX2, no VNNI" if no_vnni else "this CPU"
            for name in ("fp32", "llm.int8"):
                rows.append(f"| {cpu} | {name} | {tokens} | {med[name]['perplexity']:.4f} | {med[name]['eval']:.1f} | "
                            f"{med[name]['eval'] / med['fp32']['eval']:.2f}x | {med[name]['wall']:.1f} | "
                            f"{med[name]['wall'] / med['fp32']['wall']:.2f}x |")
            if no_vnni and before_tokens:
                base = eval_process("default", before_tokens, threads, True)
                old = eval_process(folder, before_tokens, threads, True, {"LLMCOURSE_INT_MM": "1"})
                rows.append(f"| {cpu} | fp32 | {before_tokens} | {base['perplexity']:.4f} | {base['eval']:.1f} | 1.00x | "
                            f"{base['wall']:.1f} | 1.00x |")
                rows.append(f"| {cpu}, before (`_int_mm` when exact) | llm.int8 | {before_tokens} | "
                            f"{old['perplexity']:.4f} | {old['eval']:.1f} | {old['eval'] / base['eval']:.2f}x | "
                            f"{old['wall']:.1f} | {old['wall'] / base['wall']:.2f}x |")
    return [
        "",
        f"## `llmcourse eval perplexity --max-tokens {tokens}`: fp32 vs LLM.int8(), median of {repeats} interleaved "
        "processes",
        "",
        "`eval s`: the perplexity loop's own time; `wall`: the whole process (start, model load, tokenizing). The "
        "no-VNNI rows emulate an AVX2 CPU on this one: `torch.backends.mkldnn.enabled = False` makes "
        "`torch._int_mm` run ATen's scalar loops (what torch 2.13 does on a CPU without VNNI), with "
        f"{', '.join(f'{k}={v}' for k, v in NO_VNNI_ENV.items())}. Target: LLM.int8() <= 3x fp32.",
        "",
        "| CPU | model | tokens | perplexity | eval s | vs fp32 | wall s | vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per greedy decode (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the decode benchmark (default 5)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="eval tokens for perplexity (default 4096)")
    ap.add_argument("--cmp-tokens", type=int, default=1024, help="eval tokens for KL / top-1 (default 1024)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to decode with (default 1,2)")
    ap.add_argument("--skip-quality", action="store_true", help="only the decode benchmark")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens of the eval-time section (default 4096)")
    ap.add_argument("--eval-repeats", type=int, default=1, help="interleaved rounds of the eval-time section")
    ap.add_argument("--eval-threads", type=int, default=1, help="threads of the eval-time processes (default 1)")
    ap.add_argument("--eval-before-tokens", type=int, default=0,
                    help="also time the old _int_mm choice without VNNI on this many tokens (0: skip)")
    ap.add_argument("--eval-only", action="store_true", help="only the eval-time section (-> results/int8_eval.md)")
    ap.add_argument("--skip-eval-time", action="store_true", help="leave out the eval-time section")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.md"), help="markdown output")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    if args.eval_only:
        lines = ["# 8-bit quantization: evaluation time (bench/int8.py --eval-only)", "",
                 f"Default model on {_machine()}; a shared virtual machine: ratios are within one run."]
        lines += eval_time_bench(args.eval_tokens, args.eval_threads, args.eval_repeats, args.eval_before_tokens)
        lines += ["", f"Total {time.perf_counter() - t0:.0f} s. Command: `.venv/bin/python bench/int8.py "
                  + " ".join(sys.argv[1:]) + "`"]
        text = "\n".join(lines) + "\n"
        from llmcourse.core.io import write_text

        out = args.out if args.out != ap.get_default("out") else str(Path(args.out).with_name("int8_eval.md"))
        write_text(out, text)
        print(text)
        return
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
    if not args.skip_eval_time:
        lines += eval_time_bench(args.eval_tokens, args.eval_threads, args.eval_repeats, args.eval_before_tokens)
    if not args.skip_eval_time:
        lines += eval_time_bench(args.eval_tokens, args.eval_threads, args.eval_repeats, args.eval_before_tokens)
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s. Command: `.venv/bin/python bench/int8.py "
              + " ".join(sys.argv[1:]) + "`"]
    text = "\n".join(lines) + "\n"
    from llmcourse.core.io import write_text

    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
