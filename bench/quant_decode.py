"""Quantized decoding: GGUF files executed as stored blocks (ours) vs llama.cpp on the same files (issue 26).

For each of Q8_0, Q4_0 and Q4_K_M of the default model (written by our GGUF lab from its F32 weights, cached
under ~/.cache/llmcourse/bench-gguf): greedy decode tokens/s (64 tokens after a short prompt) and prompt
tokens/s (one 512-token prompt), ours (``load_model`` + the runtime, compiled step) and llama.cpp
(llama-cpp-python, F32 KV cache like ours), the same thread count, in interleaved rounds; optionally again with
one core kept busy by a spinning process. Then the peak RSS of ``llmcourse generate`` on the Q4_K_M file,
and the physical limit of decoding: weight bytes read per token / measured memory read bandwidth, with the
time of one token's products alone (every projection through its kernel, no layer glue) against it, and the
time our first step takes to compile (or to load Inductor's cached code).

    PYTHONPATH=src .venv/bin/python bench/quant_decode.py [--threads 2] [--rounds 2] [--busy] [--isa avx2]
        [--folders int8,gptq4]

``--folders`` adds our own labs' folders of the same model as extra rows, decoded by the same block kernels
(made once by ``llmcourse quantize int8`` / ``quantize gptq``, cached beside the GGUFs): the int8 folder
(absmax per row) against our Q8_0, the GPTQ 4-bit g128 folder against our Q4_0 (issue 26's targets:
>= 1.0x and >= 0.9x), in the same interleaved rounds.

``--isa`` caps our kernels' instruction set (LLMCOURSE_BLOCK_ISA: portable, avx2, vnni). Writes
bench/results/quant_decode.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, md_table, write_result  # noqa: E402

PRESETS = ("Q8_0", "Q4_0", "Q4_K_M")
PROMPT = "The history of the city of Paris"
CACHE = Path.home() / ".cache" / "llmcourse" / "bench-gguf"


def files() -> dict[str, Path]:
    """The default model's GGUF per preset (made once by our GGUF lab, cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {p: CACHE / f"default-{p}.gguf" for p in PRESETS}
    if all(f.exists() for f in out.values()):
        return out
    from llmcourse.core.models import load_model
    from llmcourse.quant.gguf.convert import from_hf
    from llmcourse.quant.gguf.presets import quantize_gguf

    lm = load_model("default")
    for p, f in out.items():
        if not f.exists():
            quantize_gguf(from_hf(lm.model, lm.tokenizer, "f32", folder=lm.path), f, p)
    return out


# our labs' folders (--folders): name -> (the CLI's arguments, the GGUF preset it is compared with)
FOLDERS = {
    "int8": (["quantize", "int8", "--method", "absmax", "--granularity", "row"], "Q8_0"),
    "gptq4": (["quantize", "gptq", "--bits", "4", "--group-size", "128", "--samples", "32", "--seq-len", "256"],
              "Q4_0"),
}


def folders(names: list[str], threads: int) -> dict[str, Path]:
    """The default model's int8 / GPTQ folders (made once by our CLI, cached under CACHE)."""
    out = {}
    for name in names:
        path = CACHE / f"default-{name}"
        if not path.exists():
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLMCOURSE_THREADS": str(threads)}
            subprocess.run([sys.executable, "-m", "llmcourse.cli", *FOLDERS[name][0], "--model", "default",
                            "--out", str(path)], check=True, env=env)
        out[name] = path
    return out


def ours(path: Path, n: int, pp: int) -> dict[str, float]:
    import torch

    from llmcourse.core.runtime import runtime_for

    if path.is_dir():  # a lab's folder (--folders)
        from llmcourse.core.models import load_model
    else:
        from llmcourse.quant.gguf.load import load_model

    lm = load_model(str(path)) if path.is_dir() else load_model(path)
    fast = runtime_for(lm.model)
    ids = torch.tensor([lm.tokenizer(PROMPT).input_ids])
    long_ids = torch.randint(100, 40000, (1, pp), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        fast.warmup(1, ids.shape[1] + n + 8)  # compiles the step (or loads it from Inductor's cache)
        first = time.perf_counter() - t0
        for _ in range(2):
            s = fast.session(1, ids.shape[1] + n + 8)
            logits = s.prefill(ids)
            t0 = time.perf_counter()
            for _ in range(n):
                logits = s.step(logits.argmax(-1))
            decode = n / (time.perf_counter() - t0)
        times = []
        for _ in range(2):
            s = fast.session(1, pp + 8)
            t0 = time.perf_counter()
            s.prefill(long_ids)
            times.append(time.perf_counter() - t0)
    return {"decode": decode, "pp": pp / min(times), "matvec": fast.matvec, "warmup_s": first,
            **kernels_only(lm.model)}


def kernels_only(model, reps: int = 5) -> dict[str, float]:
    """One decode token's products alone: every projection of the file's model (q, k, v, o, gate, up, down per
    layer, then the head) through its block kernel on one random row, in the model's order, so each weight
    streams from memory once per pass as in a real step. Best of ``reps`` passes (ms) and the weight bytes read."""
    import torch

    from llmcourse.core.runtime.model import projections
    from llmcourse.core.runtime.weights import BlockCodes, project

    mods = [m for m in projections(model) if isinstance(getattr(m, "decode_weight", lambda: None)(), BlockCodes)]
    ws = [m.decode_weight() for m in mods]  # a lab's folder: the projections it runs through the block kernels
    xs = [torch.randn(1, m.in_features) for m in mods]
    nbytes = sum(w.blocks.numel() for w in ws)
    best = 1e9
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            for w, x in zip(ws, xs, strict=True):
                project(w, x)
            best = min(best, time.perf_counter() - t0)
    return {"kernels_ms": best * 1e3, "kernel_bytes": nbytes}


def llama(path: Path, n: int, pp: int, threads: int) -> dict[str, float]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=pp + n + 64, n_batch=pp, n_threads=threads, n_threads_batch=threads,
                          verbose=False, type_k=0, type_v=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    rng = np.random.default_rng(0)
    long_ids = rng.integers(100, 40000, pp).tolist()
    decode = 0.0
    for _ in range(2):
        llm.reset()
        llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([t])
        decode = n / (time.perf_counter() - t0)
    times = []
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long_ids)
        times.append(time.perf_counter() - t0)
    return {"decode": decode, "pp": pp / min(times)}


def one(engine: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in a fresh process (threads set before torch starts; no cache shared between runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.isa:
        env["LLMCOURSE_BLOCK_ISA"] = args.isa
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import quant_decode as q; "
            f"import torch; torch.set_num_threads({args.threads}); "
            + (f"r = q.ours(q.Path({str(path)!r}), {args.tokens}, {args.pp})" if engine == "ours"
               else f"r = q.llama(q.Path({str(path)!r}), {args.tokens}, {args.pp}, {args.threads})")
            + "; print('RESULT', json.dumps(r))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{engine} on {path.name} failed:\n{r.stderr[-2000:]}")
    import json

    return json.loads(line[7:])


def bandwidth() -> float:
    """Memory read bandwidth (bytes/s): a sum over 512 MB, best of 5."""
    import torch

    x = torch.ones(128 * 2**20)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every tensor but the token embeddings (one row), the head once
    (the embedding table when tied)."""
    from llmcourse.core.formats import read_gguf_model

    _, infos = read_gguf_model(path)
    names = {t.name for t in infos}
    total = sum(t.nbytes for t in infos if t.name != "token_embd.weight")
    if "output.weight" not in names:
        total += next(t.nbytes for t in infos if t.name == "token_embd.weight")
    return total


def peak_rss(path: Path, threads: int) -> int:
    """Peak RSS (bytes) of ``llmcourse generate`` on ``path`` (64 tokens), a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "llmcourse.cli", "generate", "--model", str(path), "--prompt", PROMPT,
           "--max-new-tokens", "64", "--threads", str(threads)]
    # a wrapper process whose only child is the command: its RUSAGE_CHILDREN peak is the command's
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    r = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True, env=env,
                       timeout=900)
    return int(r.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--busy", action="store_true", help="also measure with one core kept busy")
    p.add_argument("--isa", default="", help="cap our kernels' instruction set (portable, avx2, vnni)")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--folders", default="", help=f"also our labs' folders, compared with our GGUF rows: "
                   f"{','.join(FOLDERS)}")
    args = p.parse_args()
    paths = {k: v for k, v in files().items() if k in args.presets.split(",")}
    extra = folders([f for f in args.folders.split(",") if f], args.threads)
    bw = bandwidth()
    rows = []
    for busy in ([False, True] if args.busy else [False]):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            res: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.rounds):
                for preset, path in paths.items():
                    for engine in ("ours", "llama.cpp"):
                        res.setdefault((preset, engine), []).append(one(engine, path, args))
                for name, path in extra.items():
                    res.setdefault((name, "ours"), []).append(one("ours", path, args))
        finally:
            if spinner is not None:
                spinner.kill()
        for preset, path in paths.items():
            o, ll = res[(preset, "ours")], res[(preset, "llama.cpp")]
            nbytes = bytes_per_token(path)
            limit = bw / nbytes
            od, ld = [r["decode"] for r in o], [r["decode"] for r in ll]
            op, lp = [r["pp"] for r in o], [r["pp"] for r in ll]
            ratios = [a / b for a, b in zip(od, ld, strict=True)]  # round by round (interleaved)
            rows.append({
                "file": preset + (" (1 core busy)" if busy else ""),
                "ours decode tok/s": ", ".join(f"{v:.1f}" for v in od),
                "llama.cpp decode tok/s": ", ".join(f"{v:.1f}" for v in ld),
                "decode ratio": f"{min(ratios):.2f}–{max(ratios):.2f}x",
                "ours pp512 tok/s": ", ".join(f"{v:.0f}" for v in op),
                "llama.cpp pp512 tok/s": ", ".join(f"{v:.0f}" for v in lp),
                "pp ratio": f"{statistics.median(op) / statistics.median(lp):.2f}x",
                "MB/token": f"{nbytes / 1e6:.1f}",
                "limit tok/s": f"{limit:.0f}",
                "share ours / llama.cpp": f"{max(od) / limit:.0%} / {max(ld) / limit:.0%}",
                "our kernels ms/token": ", ".join(f"{r['kernels_ms']:.1f}" for r in o),
                # the products alone (kernels_only) against the same bandwidth: their read rate / bandwidth
                "kernels' share": f"{o[0]['kernel_bytes'] / (min(r['kernels_ms'] for r in o) / 1e3) / bw:.0%}",
                "ours warm-up s": ", ".join(f"{r['warmup_s']:.0f}" for r in o),
            })
        for name in extra:  # our folders against our own GGUF row of the same kind, round by round
            base = FOLDERS[name][1]
            o = res[(name, "ours")]
            od = [r["decode"] for r in o]
            row = {"file": f"our {name} folder vs our {base}" + (" (1 core busy)" if busy else ""),
                   "ours decode tok/s": ", ".join(f"{v:.1f}" for v in od),
                   "ours pp512 tok/s": ", ".join(f"{r['pp']:.0f}" for r in o)}
            if (base, "ours") in res:
                bd = [r["decode"] for r in res[(base, "ours")]]
                ratios = [a / b for a, b in zip(od, bd, strict=True)]
                row["decode ratio"] = f"{min(ratios):.2f}–{max(ratios):.2f}x (vs ours {', '.join(f'{v:.1f}' for v in bd)})"
            rows.append(row)
    notes = (f"{machine()}; {args.threads} threads both sides; our kernels' ISA: {args.isa or 'best'}; memory read "
             f"bandwidth {bw / 1e9:.1f} GB/s (a torch.sum over 512 MB); limit = bandwidth / weight bytes per token.")
    if not args.no_rss and "Q4_K_M" in paths:
        rss = peak_rss(paths["Q4_K_M"], args.threads)
        size = paths["Q4_K_M"].stat().st_size
        notes += (f"\n\nPeak RSS of `llmcourse generate` on the Q4_K_M file ({size / 1e6:.0f} MB): {rss / 1e6:.0f} MB "
                  f"(file + {(rss - size) / 1e6:.0f} MB).")
    table = md_table(rows)
    write_result("quant_decode", "GGUF blocks executed as stored vs llama.cpp", table, notes)


if __name__ == "__main__":
    main()
