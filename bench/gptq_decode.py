"""Greedy decode tokens/s of a 4-bit GPTQ (or RTN) folder vs the fp32 default model, same run.

The measurement of ``bench/gptq.py`` (its ``decode_tok_s``: the decoding lab's engine, prompt "The
history of", one warm-up run each, then the median of 5 interleaved runs; tokens/s counts the
prompt's prefill too, as ``llmcourse generate`` reports it), without quantizing or GPTQModel.

Run: ``.venv/bin/llmcourse quantize rtn --model default --bits 4 --group-size 128 --out /tmp/rtn4``, then
``.venv/bin/python bench/gptq_decode.py /tmp/rtn4`` (a GPTQ folder with natural g_idx runs the same
way: the step reads the same packed tensors whether GPTQ or RTN chose the codes).
"""

from __future__ import annotations

import argparse

import torch
from gptq import decode_tok_s  # bench/gptq.py, next to this script

from llmcourse.core.models import load_model
from llmcourse.core.threads import apply_threads, choose_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a 4-bit GPTQ folder (llmcourse quantize gptq|rtn --out)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    args = ap.parse_args()
    apply_threads(choose_threads(None))
    fp, q = load_model("default"), load_model(args.folder)
    speed = decode_tok_s({"fp32": (fp.model, fp.tokenizer), "4-bit": (q.model, q.tokenizer)}, args.tokens)
    for name, v in speed.items():
        print(f"{name}: {v:.1f} tok/s")
    print(f"4-bit / fp32: {speed['4-bit'] / speed['fp32']:.2f}x (target >= 1.5x); torch {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
