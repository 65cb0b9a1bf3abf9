"""Bit-exactness of our GGUF kernels on EVERY tensor of the default model, for every type.

For each tensor of SmolLM2-135M-Instruct (fp32) and each of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
Q3_K, Q4_K, Q5_K, Q6_K, without and with an importance matrix, compares our bytes with ggml's
``ggml_quantize_chunk`` from llama-cpp-python's libggml-base.so. The importance matrix is the
real one computed by ``llmcourse.quant.gguf.imatrix.collect`` on calibration windows, for the
tensors it covers (blk.*); other tensors get a synthetic positive one. 576-wide rows are joined
into rows of 2304 for the 256-wide k-quants (llama.cpp falls back to a legacy type there, but the
kernels must still be exact). Prints a markdown table, writes bench/results/gguf_exact.md.

    .venv/bin/python bench/gguf_exact.py [--windows 8] [--seq-len 256]
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

from llmcourse.core.data import calibration_windows  # noqa: E402
from llmcourse.core.io import write_text  # noqa: E402
from llmcourse.core.models import load_model  # noqa: E402
from llmcourse.quant.gguf import imatrix as im  # noqa: E402
from llmcourse.quant.gguf.blocks import LAYOUTS  # noqa: E402
from llmcourse.quant.gguf.quantize import QUANT_TYPES, quantize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="calibration windows for the imatrix")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--types", default=",".join(t.name for t in QUANT_TYPES), help="comma-separated types")
    args = ap.parse_args()

    lm = load_model("default")
    ids = calibration_windows(lm.tokenizer, args.windows, args.seq_len, seed=0)
    mat = im.collect(lm.model, ids, dataset="default calibration")
    sd = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    names = [k for k in sd if k != "lm_head.weight" or "model.embed_tokens.weight" not in sd]
    rng = np.random.default_rng(0)
    lines = ["| type | tensors | values | exact (no imatrix) | exact (imatrix) | ours s | ggml s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    all_ok = True
    for qtype in [T[t] for t in args.types.split(",")]:
        bs = LAYOUTS[qtype].block_size
        n_t = n_v = ok0 = ok1 = 0
        t_ours = t_ref = 0.0
        bad: list[str] = []
        for name in names:
            rows = rows_for(sd[name], bs)
            if rows is None:
                continue
            gname = im.module_tensor_name(name.removesuffix(".weight"))
            qw = mat.weights(gname) if gname else None
            if qw is None or qw.shape[0] != rows.shape[1]:
                qw = (rng.gamma(0.5, 1.0, rows.shape[1]) ** 2).astype(np.float32)
            n_t += 1
            n_v += rows.size
            for k, imat in enumerate((None, qw)):
                t0 = time.perf_counter()
                a = quantize(rows, qtype, imat)
                t1 = time.perf_counter()
                b = ggml_ref.quantize(rows, qtype, imat)
                t2 = time.perf_counter()
                t_ours += t1 - t0
                t_ref += t2 - t1
                same = bool(np.array_equal(a, b))
                if same:
                    ok0 += k == 0
                    ok1 += k == 1
                else:
                    bad.append(f"{name} imatrix={imat is not None} rows differing="
                               f"{int((a != b).any(axis=1).sum())}")
        all_ok &= not bad
        lines.append(f"| {qtype.name} | {n_t} | {n_v:,} | {ok0}/{n_t} | {ok1}/{n_t} | {t_ours:.1f} | {t_ref:.1f} |")
        print(lines[-1], flush=True)
        for b_ in bad[:10]:
            print("   MISMATCH", b_, flush=True)
    text = ("# GGUF kernels: bit-exactness on every tensor of the default model\n\n"
            "Our `quantize` vs ggml's `ggml_quantize_chunk` (libggml-base.so of llama-cpp-python 0.3.36). "
            f"Importance matrix: ours, {args.windows} windows x {args.seq_len} tokens, for blk.* tensors; "
            "a synthetic one elsewhere. 576-wide rows are joined into rows of 2304 for the k-quants. "
            "Times are totals over both modes on a shared 2-core machine (noisy; see bench/gguf_kernels.py "
            "for the speed comparison).\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    write_text(ROOT / "bench" / "results" / "gguf_exact.md", text)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
