"""``llmcourse quantize int8``: absmax / zero-point / LLM.int8() into a folder that reloads."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from llmcourse.core.cli_common import Result, add_common_args, add_model_args, model_kwargs, positive_int
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model
from llmcourse.quant.int8 import LAB
from llmcourse.quant.int8.formulas import GRANULARITIES, METHODS
from llmcourse.quant.int8.model import WEIGHTS_FILE, Int8Config, model_bytes, quantize_model, save_quantized


def _threshold(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def cmd_quantize_int8(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None])
    cfg = Int8Config(method=args.method, granularity=args.granularity, group_size=args.group_size,
                     threshold=args.threshold, skip=list(args.skip or []), embeddings=not args.no_embeddings)
    t0 = time.perf_counter()
    lm = load_model(args.model, **model_kwargs(args))
    if lm.kind == "int8":
        raise UserError(f"{args.model} is already an int8 folder", "quantize the original model instead")
    fp_bytes = model_bytes(lm.model)
    report = quantize_model(lm.model, cfg)
    with atomic_dir(out) as tmp:
        save_quantized(lm.model, lm.tokenizer, tmp, cfg, report, source=args.model)
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    weights = (out / WEIGHTS_FILE).stat().st_size
    data = {
        "model": args.model, "out": str(out), "method": cfg.method, "granularity": cfg.granularity,
        "group_size": cfg.gsize, "threshold": cfg.threshold if cfg.method == "llm.int8" else None,
        "scheme": cfg.name, "modules": len(report["modules"]), "tied": report["tied"],
        "bytes_on_disk": disk, "weights_file_bytes": weights,
        "bytes_in_memory": model_bytes(lm.model), "bytes_in_memory_before": fp_bytes,
        "quantized_weight_ratio": report["int8_bytes"] / report["fp32_bytes"],
        "mean_relative_weight_error": sum(report["errors"].values()) / max(1, len(report["errors"])),
        "seconds": time.perf_counter() - t0,
    }
    text = (f"wrote {out}: {cfg.name}, {data['modules']} modules, {disk / 1e6:.1f} MB on disk, "
            f"{data['bytes_in_memory'] / 1e6:.1f} MB in memory (was {fp_bytes / 1e6:.1f} MB); "
            f"quantized weights {100 * data['quantized_weight_ratio']:.1f}% of their fp32 bytes; "
            f"{data['seconds']:.1f} s.\nevaluate it with: llmcourse eval perplexity --model {out}")
    return Result(data, text)


EXAMPLES = ("examples:\n  llmcourse quantize int8 --model default --out out/int8\n"
            "  llmcourse quantize int8 --method llm.int8 --threshold 6 --model default --out out/llm-int8\n"
            "  llmcourse quantize int8 --method zeropoint --granularity group --group-size 64 --out out/zp")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = add_parser(
        sub, groups, LAB, "quantize int8", epilog=EXAMPLES,
        description="Quantize every linear layer (and the input embedding, shared with a tied head) of --model to "
        "int8 and write --out: model.safetensors (int8 codes + fp32 scales, no pickle), config, tokenizer and "
        "llmcourse.json naming the scheme. `llmcourse eval perplexity|compare --model OUT` and "
        "`llmcourse generate --model OUT` load it. absmax: s = 127/max|X|; zeropoint: s = 255/(max-min), "
        "z = round(-s min - 128); llm.int8: vector-wise int8 matmul with outlier columns (|x| >= threshold) in fp32. "
        "Plain transformers refuses the folder (its config.json has a quantization_config without quant_method); "
        "`llmcourse convert hf --model OUT --out HF_DIR` writes a de-quantized plain folder.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically; must not be the input)")
    p.add_argument("--method", default="absmax", choices=METHODS,
                   help="absmax (symmetric), zeropoint (asymmetric) or llm.int8 (Dettmers et al. 2022). "
                   "Default: %(default)s")
    p.add_argument("--granularity", default="row", choices=GRANULARITIES,
                   help="one scale per tensor, per row (output channel) or per group of --group-size inputs; "
                   "llm.int8 is row only. Default: %(default)s")
    p.add_argument("--group-size", type=positive_int, default=128,
                   help="inputs per group for --granularity group (a ragged last group is allowed). Default: %(default)s")
    p.add_argument("--threshold", type=_threshold, default=6.0,
                   help="llm.int8: an input column with any |x| >= threshold is multiplied in floating point "
                   "(0 disables the decomposition). Default: %(default)s")
    p.add_argument("--skip", action="append", metavar="NAME",
                   help="keep the module NAME (or any module whose name ends with .NAME, e.g. lm_head) in full "
                   "precision; repeatable")
    p.add_argument("--no-embeddings", action="store_true",
                   help="keep the input embedding in full precision (by default it is int8 too)")
    add_common_args(p)
    p.set_defaults(func=cmd_quantize_int8)
