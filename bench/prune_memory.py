"""Peak memory of pruning a model larger than it should need: the synthetic Llama of bench/gptq_memory.py
(default hidden 2048, 18 blocks, intermediate 5632, vocab 32000, untied head: 3.8 GB in fp32, one
safetensors shard per block), pruned reading one block at a time.

1. ``make``: bench/gptq_memory.py's writer (at no time more than one block in memory).
2. ``prune`` (a fresh process, whose peak RSS is what we report): the skeleton is built on the meta
   device; embeddings, final norm and head are read; ``prune_model`` runs with ``load_block`` reading
   block ``b`` from its shard and ``done_block`` writing the pruned block (fp16) to output shard ``b`` and
   moving it back to meta. Peak RSS ~ runtime + embeddings + head + one block + the calibration
   activations, far below the model's size.

Run: ``.venv/bin/python bench/prune_memory.py [--method wanda|sparsegpt|magnitude] [--dir /tmp/prune-mem]``
(``--reuse`` skips writing the model when the folder holds it already).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def prune(d: Path, out: Path, method: str, samples: int, seq_len: int) -> dict:
    """Prune ``d`` one block at a time into ``out``; returns figures (run in a fresh process)."""
    from gptq_memory import stream_blocks

    from llmcourse.compress import PruneConfig, prune_model
    from llmcourse.core.data import calibration_windows

    t0 = time.perf_counter()
    zeros = {"n": 0, "total": 0}

    def count_zeros(state: dict) -> None:
        for k, v in state.items():
            if k.endswith("proj.weight"):
                zeros["n"] += int((v == 0).sum())
                zeros["total"] += v.numel()

    cfg, tok, model, load_block, done_block = stream_blocks(d, out, count_zeros)
    windows = calibration_windows(tok, samples, seq_len, seed=0) % cfg.vocab_size  # random weights: any ids do
    report = prune_model(model, windows if method != "magnitude" else None, PruneConfig(method, sparsity=0.5),
                         load_block=load_block, done_block=done_block)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0, "layers": len(report["layers"]),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sparsity": report["sparsity"], "zeros_in_output": zeros["n"] / max(1, zeros["total"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/prune-mem", help="work folder (default /tmp/prune-mem)")
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reuse", action="store_true", help="keep an existing synthetic model in --dir/model")
    ap.add_argument("--step", choices=["all", "prune"], default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    d = Path(args.dir)
    if args.step == "prune":
        print(json.dumps(prune(d / "model", d / args.method, args.method, args.samples, args.seq_len)))
        return
    from gptq_memory import make

    t0 = time.perf_counter()
    if args.reuse and (d / "model" / "config.json").exists():
        size = sum(f.stat().st_size for f in (d / "model").glob("*.safetensors"))
    else:
        size = make(d / "model", args.layers, args.hidden, args.intermediate, args.vocab)
    made = time.perf_counter() - t0
    p = subprocess.run([sys.executable, __file__, "--dir", str(d), "--method", args.method, "--samples",
                        str(args.samples), "--seq-len", str(args.seq_len), "--step", "prune"],
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"synthetic Llama: {size / 1e9:.2f} GB fp32 (ready in {made:.0f} s); {args.method} 50% on {args.samples} x "
          f"{args.seq_len} tokens, block by block: {r['seconds']:.0f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({100 * r['peak_rss_bytes'] / size:.0f}% of the model); sparsity {r['sparsity']:.4f} "
          f"({r['zeros_in_output']:.4f} zeros in the fp16 output) over {r['layers']} layers")


if __name__ == "__main__":
    main()
