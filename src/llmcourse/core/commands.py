"""Core commands: ``models``, ``eval perplexity|compare``, ``convert hf``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmcourse.core.cli_common import (
    Result,
    add_chat_template_args,
    add_common_args,
    add_data_args,
    add_model_args,
    model_kwargs,
    positive_int,
)
from llmcourse.core.data import load_text, tokenize_stream
from llmcourse.core.errors import UserError
from llmcourse.core.evaluate import compare, perplexity
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model, model_card, save_hf


def cmd_models(args: argparse.Namespace) -> Result:
    lm = load_model(args.model, **model_kwargs(args))
    card = model_card(lm)
    text = "\n".join(f"{k:16} {v}" for k, v in card.items())
    if args.chat_sample:
        from llmcourse.core.chat_template import set_chat_template
        from llmcourse.core.models import chat_sample

        set_chat_template(lm.tokenizer, args.chat_template)
        card["chat_sample"] = chat_sample(lm, args.chat_sample)
        text += f"\n\nchat sample:\n> {args.chat_sample}\n{card['chat_sample']}"
    return Result(card, text)


def _eval_ids(args: argparse.Namespace, text: str, tokenizer):
    from llmcourse.core.progress import phase

    with phase(f"tokenizing {len(text):,} characters"):
        ids = tokenize_stream(tokenizer, text)
    if args.max_tokens is not None:
        ids = ids[:, : args.max_tokens]
    return ids


def cmd_perplexity(args: argparse.Namespace) -> Result:
    text = load_text(args.data, args.split, args.field)  # bad data fails before the model loads
    lm = load_model(args.model, **model_kwargs(args))
    ids = _eval_ids(args, text, lm.tokenizer)
    r = perplexity(lm.model, ids, max_length=args.max_length, stride=args.stride,
                   weighting="exact" if args.exact else "hf")
    data = {"model": args.model, "data": args.data, "split": args.split if args.data == "default" else None, **r}
    text = (f"perplexity {r['perplexity']:.4f}  (nll {r['nll']:.4f}, {r['tokens']} tokens, "
            f"window {args.max_length}/stride {args.stride}, {r['tokens_per_second']:.0f} tok/s)")
    return Result(data, text)


def cmd_compare(args: argparse.Namespace) -> Result:
    kw = model_kwargs(args)
    text = load_text(args.data, args.split, args.field)
    lm = load_model(args.model, **kw)
    ref = load_model(args.reference, **kw)
    if len(lm.tokenizer) != len(ref.tokenizer):
        raise UserError(f"{args.model} and {args.reference} have different vocabularies",
                        "compare models that share a tokenizer")
    ids = _eval_ids(args, text, ref.tokenizer)
    r = compare(lm.model, ref.model, ids, max_length=args.max_length, max_tokens=None)
    data = {"model": args.model, "reference": args.reference, **r}
    text = (f"KL(ref || model) {r['kl_divergence']:.5f} nats/token, top-1 agreement {100 * r['top1_agreement']:.2f}% "
            f"over {r['tokens']} tokens ({r['tokens_per_second']:.0f} tok/s)")
    return Result(data, text)


def cmd_convert_hf(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None])
    t0 = time.perf_counter()
    lm = load_model(args.model, **model_kwargs(args))
    # a lab's quantized model (its modules are not nn.Linear) offers a plain de-quantized copy
    dequantized = callable(lm.info.get("dequantize"))
    model = lm.info["dequantize"]() if dequantized else lm.model
    with atomic_dir(out) as tmp:
        save_hf(model, lm.tokenizer, tmp)
    n_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    files = sorted(f.name for f in out.iterdir() if f.is_file() and not f.name.startswith("."))
    data = {"model": args.model, "out": str(out), "dtype": args.dtype, "bytes": n_bytes,
            "dequantized_from": lm.kind if dequantized else None, "files": files,
            "seconds": time.perf_counter() - t0}
    how = f", de-quantized from {lm.kind}" if dequantized else ""
    return Result(data, f"wrote {out} ({n_bytes / 1e6:.1f} MB, {args.dtype}{how}) in {data['seconds']:.1f} s: "
                  + ", ".join(files))


EXAMPLES = {
    "models": "examples:\n  llmcourse models\n  llmcourse models --model out/int8 --chat-sample \"What is the capital of France?\"\n"
              "  llmcourse models --chat-sample \"Hi\" --chat-template my_template.jinja",
    "eval perplexity": "examples:\n  llmcourse eval perplexity --model default --max-length 1024 --stride 512\n"
                       "  llmcourse eval perplexity --model out/gguf/smollm2-Q4_K_M.gguf --data notes.txt --json",
    "eval compare": "examples:\n  llmcourse eval compare --model out/int8 --reference default",
    "convert hf": "examples:\n  llmcourse convert hf --model model.gguf --out out/hf",
}


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.core import LAB

    p = add_parser(sub, groups, LAB, "models", epilog=EXAMPLES["models"], description="Load --model and print its card: parameters, bytes, architecture, context, "
                       "load time. The first use of 'default' converts the packaged GGUF once (~20-50 s).")
    add_model_args(p)
    p.add_argument("--chat-sample", metavar="QUESTION", default=None,
                   help="also answer QUESTION with the model's chat template (greedy, 40 tokens)")
    add_chat_template_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_models)

    def window_args(q: argparse.ArgumentParser, max_len: int, stride: bool) -> None:
        q.add_argument("--max-length", type=positive_int, default=max_len,
                       help="tokens per window (the context each prediction sees at most). Default: %(default)s")
        if stride:
            q.add_argument("--stride", type=positive_int, default=max_len // 2,
                           help="tokens between window starts; each window scores only its new tokens "
                           "(the Hugging Face recipe). Default: %(default)s")
        q.add_argument("--max-tokens", type=positive_int, default=None,
                       help="evaluate only the first N tokens of the text (default: all)")

    pp = add_parser(sub, groups, LAB, "eval perplexity", epilog=EXAMPLES["eval perplexity"], description="Perplexity exp(mean NLL) with a sliding window (--max-length, --stride), equal to "
                        "the Hugging Face perplexity recipe. Default text: the eval split of the Wikipedia extracts "
                        "(~13.6k tokens).")
    add_model_args(pp)
    add_data_args(pp)
    window_args(pp, 1024, True)
    pp.add_argument("--exact", action="store_true",
                    help="average over every scored token instead of reproducing the HF recipe's per-window "
                    "weighting (trg_len - 1); differs by < 0.1%% at the default stride")
    add_common_args(pp)
    pp.set_defaults(func=cmd_perplexity)

    pc = add_parser(sub, groups, LAB, "eval compare", epilog=EXAMPLES["eval compare"], description="Run --model and --reference on the same non-overlapping windows and report the mean "
                        "KL(P_ref || P_model) per token and the share of positions where their argmax agree.")
    add_model_args(pc)
    pc.add_argument("--reference", default="default", help="reference model (same tokenizer). Default: %(default)s")
    add_data_args(pc)
    window_args(pc, 512, False)
    add_common_args(pc)
    pc.set_defaults(func=cmd_compare)

    ph = add_parser(sub, groups, LAB, "convert hf", epilog=EXAMPLES["convert hf"], description="Load --model (de-quantizing a GGUF) and write a plain Hugging Face "
                                      "folder: config.json, model.safetensors, tokenizer files.")
    add_model_args(ph)
    ph.add_argument("--out", required=True, help="output folder (written atomically; must not be the input)")
    add_common_args(ph)
    ph.set_defaults(func=cmd_convert_hf)
