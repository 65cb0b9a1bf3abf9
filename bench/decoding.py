"""Decoding speed: llmcourse's engine vs transformers' generate() and llama.cpp, same machine, same run.

Default model (SmolLM2-135M-Instruct), fp32, 2 threads, 64 new tokens after "I have a dream".
Rows: greedy, sampling (temperature 0.8, top-k 50, top-p 0.95) and beam-4 against
``generate()``; greedy against llama-cpp-python on an F32 GGUF of the same weights (written by
the GGUF lab's converter). Medians of ``--runs`` runs; every generation is forced to 64 steps
(EOS does not stop it) except beam search, which both sides run with identical semantics.
Also prints the memory-bandwidth bound: weight bytes read per token / measured read bandwidth,
and the peak memory of one greedy generation per step path (``mm``, ``compiled``), each in a fresh
process: its peak RSS (VmHWM, which includes the Python + torch + transformers runtime), and the
peak minus the RSS after those imports, against the weights' bytes.

    .venv/bin/python bench/decoding.py [--runs 5] [--threads 2] [--memory-only]
    .venv/bin/python bench/decoding.py --model gemma3 --no-llama-cpp --no-memory   # the second real model

Absolute speeds on a shared 2-core machine are noisy: read the ratios, which come from
interleaved runs of both sides.
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

import torch

ROOT = Path(__file__).resolve().parent
PROMPT = "I have a dream"
N_NEW = 64


def read_bandwidth(threads: int, gib: float = 1.0, runs: int = 5) -> float:
    """Bytes/s of a large ``torch.sum`` (a pure streaming read)."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    x.sum()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts)


def weight_bytes_per_token(model) -> int:
    """Bytes of every weight a decode step reads: all parameters except the embedding table (one row is read),
    plus the output head once (counted even when it is tied to the embedding)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total -= emb.numel() * emb.element_size()
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def llama_cpp_runner(lm, threads: int, prompt_ids: list[int], tmp: Path):
    """A function that greedily generates N_NEW tokens with llama.cpp on an F32 GGUF, and a note."""
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed: llama.cpp rows skipped"
    try:
        from llmcourse.quant.gguf import convert_to_gguf as convert
    except ImportError:
        return None, "the GGUF lab's converter is not available: llama.cpp rows skipped"
    gguf_path = tmp / "default-f32.gguf"
    convert(lm.model, lm.tokenizer, gguf_path, outtype="f32")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=threads, n_threads_batch=threads,
                          n_batch=64, verbose=False, seed=0)
    toks = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    note = "" if toks == prompt_ids else f"(llama.cpp tokenized the prompt as {toks}, ours {prompt_ids})"

    def run() -> None:
        llm.reset()
        n = 0
        for _ in llm.generate(toks, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == N_NEW:
                break

    return run, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp row")
    ap.add_argument("--no-eager", action="store_true", help="skip the uncompiled ('mm') fast-path row")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory table (two processes, ~1 min)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    ap.add_argument("--model", default="default", help="the model (--model of any command). Default: %(default)s")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    memory = "" if args.no_memory else memory_table(args.threads)
    print(memory)
    if args.memory_only:
        return 0

    from llmcourse.core.models import load_model
    from llmcourse.core.runtime import FastModel
    from llmcourse.decoding import GenerationConfig, generate, prepare

    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    prompt_ids = tok(PROMPT).input_ids
    ids = torch.tensor([prompt_ids])
    fast = prepare(model)  # built once per model, like loading: the default ("auto") fast path
    print(f"fast path: matvec {fast.matvec}", file=sys.stderr)

    def hf(**kw):
        def run() -> None:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=N_NEW, **kw)
        return run

    def ours(target=model, **kw):
        def run() -> None:
            generate(target, tok, prompt_ids, GenerationConfig(max_new_tokens=N_NEW, **kw))
        return run

    eager = None if args.no_eager else FastModel(model, matvec="mm")
    t0 = time.perf_counter()
    for rows in (1, 4):  # compile the step for greedy/sampling and for beam-4 (Inductor caches it on disk)
        fast.warmup(rows, len(prompt_ids) + N_NEW)
    print(f"compiled decode step ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    never = dict(eos_token_ids=())
    samp = dict(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    beam_steps = generate(model, tok, prompt_ids, GenerationConfig(strategy="beam", num_beams=4,
                                                                   max_new_tokens=N_NEW)).steps
    cases = [
        (f"greedy ({fast.matvec} step)", hf(do_sample=False, min_new_tokens=N_NEW), ours(**never), N_NEW),
        *([("greedy, uncompiled fast path (mm)", hf(do_sample=False, min_new_tokens=N_NEW), ours(eager, **never),
            N_NEW)] if eager is not None else []),
        ("sampling (T 0.8, top-k 50, top-p 0.95)", hf(do_sample=True, min_new_tokens=N_NEW, temperature=0.8,
                                                       top_k=50, top_p=0.95),
         ours(strategy="sample", **never, **samp), N_NEW),
        ("beam-4", hf(do_sample=False, num_beams=4), ours(strategy="beam", num_beams=4), beam_steps),
    ]
    rows = []
    ours_tps: dict[str, float] = {}
    for name, f_hf, f_ours, steps in cases:
        t_hf, t_ours = [], []
        f_hf()
        f_ours()
        for _ in range(args.runs):  # interleaved, so both sides see the same machine load
            t_hf += timed_once(f_hf)
            t_ours += timed_once(f_ours)
        hf_tps = steps / statistics.median(t_hf)
        ours_tps[name] = steps / statistics.median(t_ours)
        rows.append((name, "transformers generate()", hf_tps, ours_tps[name], ours_tps[name] / hf_tps))
        print(f"{name}: generate() {hf_tps:.1f} tok/s, ours {ours_tps[name]:.1f} tok/s", file=sys.stderr)
    best = cases[0][0]  # the default fast path is the one compared with llama.cpp
    greedy_ours = ours_tps[best]

    note = ""
    if not args.no_llama_cpp:
        with tempfile.TemporaryDirectory(prefix="bench_decoding_") as tmp:
            run_cpp, note = llama_cpp_runner(lm, args.threads, prompt_ids, Path(tmp))
            if run_cpp is not None:
                runner = next(c[2] for c in cases if c[0] == best)
                run_cpp()
                t_cpp, t_ours = [], []
                for _ in range(args.runs):
                    t_cpp += timed_once(run_cpp)
                    t_ours += timed_once(runner)
                cpp_tps = N_NEW / statistics.median(t_cpp)
                our_tps = N_NEW / statistics.median(t_ours)
                rows.append((best, "llama.cpp F32 GGUF", cpp_tps, our_tps, our_tps / cpp_tps))
                print(f"llama.cpp {cpp_tps:.1f} tok/s, ours {our_tps:.1f} tok/s", file=sys.stderr)

    bw = read_bandwidth(args.threads)
    wbytes = weight_bytes_per_token(model)
    bound = bw / wbytes
    lines = [
        f"Model {args.model} ({model.config.model_type}) fp32, {args.threads} threads, {N_NEW} new tokens, median of {args.runs} runs "
        f"(beam-4 ran {beam_steps} steps).",
        "",
        "| strategy | anchor | anchor tok/s | ours tok/s | ours / anchor |",
        "|---|---|---:|---:|---:|",
        *[f"| {n} | {a} | {x:.1f} | {y:.1f} | {r:.2f}x |" for n, a, x, y, r in rows],
        "",
        f"Memory-bandwidth bound: {wbytes / 1e6:.0f} MB of weights read per token / {bw / 1e9:.1f} GB/s "
        f"measured read bandwidth = {bound:.1f} tok/s; our greedy reaches {greedy_ours:.1f} tok/s = "
        f"{100 * greedy_ours / bound:.0f}% of it.",
    ]
    if note:
        lines += ["", note]
    lines += ["", memory]
    table = "\n".join(lines)
    print(table)
    from llmcourse.core.io import write_text

    name = "decoding.md" if args.model == "default" else f"decoding-{Path(args.model).name}.md"
    write_text(ROOT / "results" / name, table + "\n")
    return 0


MEMORY_PROBE = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
torch.set_num_threads(int(sys.argv[1]))
from llmcourse.core.models import import_runtime, load_model
import_runtime()
import llmcourse.decoding
after_imports = status("VmRSS")
from llmcourse.decoding import GenerationConfig, generate
lm = load_model("default")
out = generate(lm.model, lm.tokenizer, "I have a dream", GenerationConfig(max_new_tokens=64, eos_token_ids=()))
print(json.dumps({"peak": status("VmHWM"), "after_imports": after_imports, "tokens": out.steps,
                  "weights": sum(p.numel() * p.element_size() for p in lm.model.parameters())}))
"""


def peak_memory(matvec: str, threads: int) -> dict:
    """Peak RSS of a fresh process that loads the default model and generates 64 tokens on ``matvec``."""
    env = {**os.environ, "LLMCOURSE_COMPILE": "1" if matvec == "compiled" else "0"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_table(threads: int) -> str:
    rows = []
    for matvec in ("mm", "compiled"):
        m = peak_memory(matvec, threads)
        above = m["peak"] - m["after_imports"]
        rows.append(f"| {matvec} | {m['peak'] / 2**20:.0f} MiB | {m['after_imports'] / 2**20:.0f} MiB | "
                    f"{above / 2**20:.0f} MiB | {m['weights'] / 2**20:.0f} MiB | {above / m['weights']:.2f}x |")
        print(f"memory {matvec}: {rows[-1]}", file=sys.stderr)
    return "\n".join([
        f"Peak memory of one greedy generation ({N_NEW} tokens, default model fp32), a fresh process per step "
        "path. Peak RSS includes the Python + torch + transformers runtime; 'after imports' is the RSS once "
        "torch, transformers' model/tokenizer modules and llmcourse.decoding are imported, before the model loads.",
        "",
        "| step path | peak RSS | RSS after imports | peak - imports | weights | (peak - imports) / weights |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])


def timed_once(fn) -> list[float]:
    t = time.perf_counter()
    fn()
    return [time.perf_counter() - t]


if __name__ == "__main__":
    raise SystemExit(main())
