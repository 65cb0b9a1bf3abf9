"""Speed of our GGUF kernels against ggml's C quantizers, same tensors, same run.

Anchor: ``ggml_quantize_chunk`` of llama-cpp-python 0.3.36's libggml-base.so (single-threaded C,
the function llama_model_quantize calls per tensor). Ours: ``llmcourse.quant.gguf.quantize``
(numpy; torch for a few per-block reductions, one thread). Tensors: all linear weights of the
first ``--layers`` layers of the default model plus ``--embed-rows`` rows of the embedding (576-wide
rows are joined into rows of 2304 for the 256-wide k-quants). Each timing is the minimum over
``--repeats`` runs (the machine is shared: minima are the least disturbed; medians are shown too).
Prints a markdown table and writes bench/results/gguf_kernels.md.

    .venv/bin/python bench/gguf_kernels.py [--layers 4] [--embed-rows 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "quant" / "gguf"))

import ggml_ref  # noqa: E402
import numpy as np  # noqa: E402
from common import rows_for  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from llmcourse.core.io import write_text  # noqa: E402
from llmcourse.core.models import load_model  # noqa: E402
from llmcourse.quant.gguf.blocks import LAYOUTS  # noqa: E402
from llmcourse.quant.gguf.quantize import QUANT_TYPES, quantize  # noqa: E402


def timed(fn, tensors, qtype, imats) -> float:
    t0 = time.perf_counter()
    for x, qw in zip(tensors, imats, strict=True):
        fn(x, qtype, qw)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="how many transformer layers' weights to use")
    ap.add_argument("--embed-rows", type=int, default=4096, help="rows of the token embedding to add")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per type and side")
    ap.add_argument("--types", default=",".join(t.name for t in QUANT_TYPES), help="comma-separated types")
    args = ap.parse_args()

    lm = load_model("default")
    sd = lm.model.state_dict()
    ws = [v.detach().float().numpy() for k, v in sd.items()
          if v.ndim == 2 and k.startswith(tuple(f"model.layers.{i}." for i in range(args.layers)))]
    ws.append(sd["model.embed_tokens.weight"][: args.embed_rows].detach().float().numpy())
    rng = np.random.default_rng(0)
    lines = ["| type | imatrix | values | ours s (min / median) | ggml s (min / median) | ours / ggml (min) | ours ns/value |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for qtype in [T[t] for t in args.types.split(",")]:
        tensors = [r for w in ws if (r := rows_for(w, LAYOUTS[qtype].block_size)) is not None]
        n_val = sum(t.size for t in tensors)
        modes = [False] if qtype == T.Q8_0 else [False, True]  # Q8_0 ignores the imatrix
        for use_imat in modes:
            imats = [(rng.gamma(0.5, 1.0, t.shape[1]) ** 2).astype(np.float32) if use_imat else None
                     for t in tensors]
            ours, ref = [], []
            for _ in range(args.repeats):  # interleaved, so both sides see the same load
                ours.append(timed(quantize, tensors, qtype, imats))
                ref.append(timed(ggml_ref.quantize, tensors, qtype, imats))
            lines.append(f"| {qtype.name} | {'yes' if use_imat else 'no'} | {n_val:,} | "
                         f"{min(ours):.3f} / {np.median(ours):.3f} | {min(ref):.3f} / {np.median(ref):.3f} | "
                         f"{min(ours) / min(ref):.2f} | {min(ours) / n_val * 1e9:.1f} |")
            print(lines[-1], flush=True)
    text = ("# GGUF kernels: our numpy quantizers vs ggml's C (ggml_quantize_chunk)\n\n"
            f"Tensors: the linear weights of layers 0-{args.layers - 1} of SmolLM2-135M plus {args.embed_rows} "
            f"embedding rows; min and median of {args.repeats} interleaved runs; ggml single-threaded, ours one "
            "thread. Shared 2-core machine: absolute times are noisy, compare the ratio.\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    write_text(ROOT / "bench" / "results" / "gguf_kernels.md", text)


if __name__ == "__main__":
    main()
