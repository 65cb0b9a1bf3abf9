"""Greedy decode tokens/s of a 4-bit GPTQ (or RTN) folder vs the fp32 default model, same run.

Both run through the decoding lab's engine (``generate``, compiled step, prompt "The history of",
64 greedy tokens, EOS ignored); one warm-up run each (compiles the step), then the median of 5
interleaved runs. tokens/s counts the prompt's prefill too, as ``llmcourse generate`` reports it.

Run: ``.venv/bin/llmcourse quantize rtn --model default --bits 4 --group-size 128 --out /tmp/rtn4``, then
``.venv/bin/python bench/gptq_decode.py /tmp/rtn4`` (any GPTQ folder with natural g_idx works the same:
the step reads the same packed tensors whether GPTQ or RTN chose the codes).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from llmcourse.core.models import load_model
from llmcourse.core.threads import apply_threads, choose_threads
from llmcourse.decoding import GenerationConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a 4-bit GPTQ folder (llmcourse quantize gptq|rtn --out)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    apply_threads(choose_threads(None))
    models = {"fp32": load_model("default"), "4-bit": load_model(args.folder)}
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=args.tokens, eos_token_ids=())
    for lm in models.values():
        generate(lm.model, lm.tokenizer, "The history of", cfg)
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.runs):
        for name, lm in models.items():
            speeds[name].append(generate(lm.model, lm.tokenizer, "The history of", cfg).tokens_per_second)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for k, v in speeds.items():
        print(f"{k}: {med[k]:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in v)})")
    print(f"4-bit / fp32: {med['4-bit'] / med['fp32']:.2f}x (target >= 1.5x); torch {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
