"""Decoding speed: llmcourse's engine vs transformers' generate() and llama.cpp, same machine, same run.

Default model (SmolLM2-135M-Instruct), fp32, 2 threads, 64 new tokens after "I have a dream".
Rows: greedy, sampling (temperature 0.8, top-k 50, top-p 0.95) and beam-4 against
``generate()``; greedy against llama-cpp-python on an F32 GGUF of the same weights (written by
the GGUF lab's converter). Medians of ``--runs`` runs; every generation is forced to 64 steps
(EOS does not stop it) except beam search, which both sides run with identical semantics.
Also prints the memory-bandwidth bound: weight bytes read per token / measured read bandwidth.

    .venv/bin/python bench/decoding.py [--runs 5] [--threads 2]

Absolute speeds on a shared 2-core machine are noisy: read the ratios, which come from
interleaved runs of both sides.
"""

from __future__ import annotations

import argparse
import statistics
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


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def llama_cpp_rows(lm, runs: int, threads: int, prompt_ids: list[int]) -> tuple[list[float] | None, str]:
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed: llama.cpp rows skipped"
    try:
        from llmcourse.quant.gguf.convert import convert
    except ImportError:
        return None, "the GGUF lab's converter is not available: llama.cpp rows skipped"
    tmp = Path(tempfile.mkdtemp(prefix="bench_decoding_"))
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

    ts = timed(run, runs)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return ts, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llmcourse.core.models import load_model
    from llmcourse.decoding import GenerationConfig, generate, prepare

    lm = load_model("default")
    model, tok = lm.model, lm.tokenizer
    prompt_ids = tok(PROMPT).input_ids
    ids = torch.tensor([prompt_ids])
    prepare(model)  # the transposed weights are built once per model, like loading

    def hf(**kw):
        def run() -> None:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=N_NEW, **kw)
        return run

    def ours(**kw):
        def run() -> None:
            generate(model, tok, prompt_ids, GenerationConfig(max_new_tokens=N_NEW, **kw))
        return run

    never = dict(eos_token_ids=())
    samp = dict(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    beam_steps = generate(model, tok, prompt_ids, GenerationConfig(strategy="beam", num_beams=4,
                                                                   max_new_tokens=N_NEW)).steps
    cases = [
        ("greedy", hf(do_sample=False, min_new_tokens=N_NEW), ours(**never), N_NEW),
        ("sampling (T 0.8, top-k 50, top-p 0.95)", hf(do_sample=True, min_new_tokens=N_NEW, temperature=0.8,
                                                       top_k=50, top_p=0.95),
         ours(strategy="sample", **never, **samp), N_NEW),
        ("beam-4", hf(do_sample=False, num_beams=4), ours(strategy="beam", num_beams=4), beam_steps),
    ]
    rows = []
    greedy_ours = None
    for name, f_hf, f_ours, steps in cases:
        t_hf, t_ours = [], []
        f_hf()
        f_ours()
        for _ in range(args.runs):  # interleaved, so both sides see the same machine load
            t_hf += timed_once(f_hf)
            t_ours += timed_once(f_ours)
        hf_tps = steps / statistics.median(t_hf)
        our_tps = steps / statistics.median(t_ours)
        if name == "greedy":
            greedy_ours = our_tps
        rows.append((name, "transformers generate()", hf_tps, our_tps, our_tps / hf_tps))
        print(f"{name}: generate() {hf_tps:.1f} tok/s, ours {our_tps:.1f} tok/s", file=sys.stderr)

    note = ""
    if not args.no_llama_cpp:
        ts, note = llama_cpp_rows(lm, args.runs, args.threads, prompt_ids)
        if ts is not None:
            cpp_tps = N_NEW / statistics.median(ts)
            t_ours = [t for _ in range(args.runs) for t in timed_once(cases[0][2])]
            our_tps = N_NEW / statistics.median(t_ours)
            rows.append(("greedy", "llama.cpp F32 GGUF", cpp_tps, our_tps, our_tps / cpp_tps))
            greedy_ours = our_tps

    bw = read_bandwidth(args.threads)
    wbytes = weight_bytes_per_token(model)
    bound = bw / wbytes
    lines = [
        f"Default model fp32, {args.threads} threads, {N_NEW} new tokens, median of {args.runs} runs "
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
    table = "\n".join(lines)
    print(table)
    from llmcourse.core.io import write_text

    write_text(ROOT / "results" / "decoding.md", table + "\n")
    return 0


def timed_once(fn) -> list[float]:
    t = time.perf_counter()
    fn()
    return [time.perf_counter() - t]


if __name__ == "__main__":
    raise SystemExit(main())
