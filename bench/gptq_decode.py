"""Greedy decode tokens/s of a 4-bit GPTQ (or RTN) folder vs the fp32 default model, same run.

The measurement of ``bench/gptq.py`` (its ``decode_tok_s``: the decoding lab's engine, prompt "The
history of", one warm-up run each, then the median of 5 interleaved runs; tokens/s counts the
prompt's prefill too, as ``llmcourse generate`` reports it), without quantizing or GPTQModel.

Run: ``.venv/bin/llmcourse quantize rtn --model default --bits 4 --group-size 128 --out /tmp/rtn4``, then
``.venv/bin/python bench/gptq_decode.py /tmp/rtn4`` (a GPTQ folder with natural g_idx runs the same
way: the step reads the same packed tensors whether GPTQ or RTN chose the codes).

``--agreement`` instead compares the numbers of the two products a folder can be decoded with: the GGUF
block kernels (8-bit activations; the default) and the lab's weight-only product (fp32 activations:
``LLMCOURSE_GPTQ_KERNEL=packed`` / ``LLMCOURSE_INT8_KERNEL=rows``), on eval windows of 48 tokens (few
rows: the block path): mean KL(weight-only ‖ blocks) of the next-token distributions, top-1 agreement,
max |Δlogit|. Any GPTQ or int8 folder (``llmcourse quantize int8 --out F``) runs.
"""

from __future__ import annotations

import argparse
import os

import torch
from gptq import decode_tok_s  # bench/gptq.py, next to this script

from llmcourse.core.models import load_model
from llmcourse.core.threads import apply_threads, choose_threads
from llmcourse.quant.gptq.blocks import kernel_choice as gptq_kernel_choice
from llmcourse.quant.int8.linear import kernel_choice as int8_kernel_choice

SWITCHES = {"gptq": ("LLMCOURSE_GPTQ_KERNEL", "packed", gptq_kernel_choice),
            "int8": ("LLMCOURSE_INT8_KERNEL", "rows", int8_kernel_choice)}  # variable, weight-only, its reader


def agreement(folder: str, windows: int, width: int = 48) -> dict[str, float]:
    """Block kernels vs the weight-only product on ``windows`` eval windows of ``width`` tokens of ``folder``."""
    from llmcourse.core.data import load_text, tokenize_stream

    lm = load_model(folder)
    var, weight_only, choice = SWITCHES[lm.kind]
    ids = tokenize_stream(lm.tokenizer, load_text("default", "eval")[:200_000])[0, :windows * width]
    ids = ids.view(windows, width)
    logits = {}
    with torch.no_grad():
        for name, value in (("blocks", "blocks"), ("weight-only", weight_only)):
            os.environ[var] = value
            choice.cache_clear()  # the switch is read once per process
            logits[name] = torch.cat([lm.model(w[None]).logits[0] for w in ids]).double()
    os.environ.pop(var)
    choice.cache_clear()
    ref = load_model("default").model
    with torch.no_grad():
        logits["fp32"] = torch.cat([ref(w[None]).logits[0] for w in ids]).double()

    def kl(a: str, b: str) -> torch.Tensor:
        p, q = logits[a].log_softmax(-1), logits[b].log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    def top1(a: str, b: str) -> float:
        return float((logits[a].argmax(-1) == logits[b].argmax(-1)).double().mean())

    d = kl("weight-only", "blocks")
    return {"positions": float(d.numel()), "mean KL(weight-only || blocks)": float(d.mean()),
            "max KL": float(d.max()), "top-1 agreement": top1("weight-only", "blocks"),
            "max |dlogit|": float((logits["blocks"] - logits["weight-only"]).abs().max()),
            "mean KL(fp32 || weight-only)": float(kl("fp32", "weight-only").mean()),
            "mean KL(fp32 || blocks)": float(kl("fp32", "blocks").mean()),
            "top-1 vs fp32, weight-only": top1("fp32", "weight-only"), "top-1 vs fp32, blocks": top1("fp32", "blocks")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a 4-bit GPTQ folder (llmcourse quantize gptq|rtn --out)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    ap.add_argument("--agreement", type=int, default=0, metavar="WINDOWS",
                    help="compare the block kernels with the weight-only product on this many 48-token windows")
    args = ap.parse_args()
    apply_threads(choose_threads(None))
    if args.agreement:
        for k, v in agreement(args.folder, args.agreement).items():
            print(f"{k}: {v:.6g}")
        return
    fp, q = load_model("default"), load_model(args.folder)
    speed = decode_tok_s({"fp32": (fp.model, fp.tokenizer), "4-bit": (q.model, q.tokenizer)}, args.tokens)
    for name, v in speed.items():
        print(f"{name}: {v:.1f} tok/s")
    print(f"4-bit / fp32: {speed['4-bit'] / speed['fp32']:.2f}x (target >= 1.5x); torch {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
