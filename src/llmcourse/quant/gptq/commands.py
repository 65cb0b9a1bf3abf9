"""``llmcourse quantize gptq`` and ``llmcourse quantize rtn``: a model -> a standard GPTQ checkpoint folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmcourse.core.cli_common import (
    Result,
    add_common_args,
    add_config_args,
    add_data_args,
    add_model_args,
    config_from_args,
    model_kwargs,
    positive_int,
)
from llmcourse.core.data import calibration_windows
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model
from llmcourse.quant.gptq.model import (
    GPTQ_ONLY,
    LOG_FILE,
    GPTQConfig,
    check_calibration,
    check_model,
    quantize_model,
    save_quantized,
)


def cmd_quantize(args: argparse.Namespace) -> Result:
    method = args.method
    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None, args.data])
    cfg = config_from_args(GPTQConfig, args, method=method)
    t0 = time.perf_counter()
    lm = load_model(args.model, **model_kwargs(args))
    if lm.kind not in ("hf", "default", "hub", "gguf") or getattr(lm.model.config, "quantization_config", None):
        raise UserError(f"{args.model} is already quantized ({lm.kind})", "quantize the original model instead")
    check_model(lm.model, cfg)
    windows = None
    log_errors = getattr(args, "log_errors", False)
    if method == "rtn" and args.samples_given and not log_errors:
        raise UserError("--samples and --seq-len set RTN's calibration, which runs only to log output errors",
                        "add --log-errors, or drop them (RTN needs no calibration)")
    if method == "gptq" or log_errors:
        check_calibration(lm.model, args.samples * args.seq_len)
        windows = calibration_windows(lm.tokenizer, args.samples, args.seq_len, seed=args.seed, data=args.data,
                                      field=args.field, split=args.split)
    report = quantize_model(lm.model, windows, cfg)
    report["source"] = args.model
    report["data"] = {"data": args.data, "split": args.split, "samples": args.samples, "seq_len": args.seq_len,
                      "seed": args.seed} if windows is not None else None
    with atomic_dir(out) as tmp:
        save_quantized(lm.model, lm.tokenizer, tmp, cfg, report, source=args.model)
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    layers = report["layers"]
    data = {
        "model": args.model, "out": str(out), "scheme": cfg.name, "config": cfg.quantize_config(),
        "layers": len(layers), "bytes_on_disk": disk, "quantize_seconds": report["seconds"],
        "seconds": time.perf_counter() - t0, "log": str(out / LOG_FILE),
    }
    text = f"wrote {out}: {cfg.name}, {len(layers)} layers, {disk / 1e6:.1f} MB on disk, " \
           f"quantized in {report['seconds']:.1f} s"
    if layers and "rtn_error" in layers[0]:
        key = "gptq_error" if method == "gptq" else "error"
        ratio = sum(r[key] for r in layers) / max(1e-30, sum(r["rtn_error"] for r in layers))
        better = sum(r[key] <= r["rtn_error"] for r in layers)
        data["error_vs_rtn"], data["layers_not_worse_than_rtn"] = ratio, better
        if method == "gptq":
            text += f"; output error {ratio:.3f} x RTN's, lower or equal in {better}/{len(layers)} layers"
        else:
            text += f"; output errors logged in {LOG_FILE}"
    text += f".\nevaluate it with: llmcourse eval perplexity --model {out}"
    return Result(data, text)


def _cmd_gptq(args: argparse.Namespace) -> Result:
    args.method = "gptq"
    return cmd_quantize(args)


def _cmd_rtn(args: argparse.Namespace) -> Result:
    args.method = "rtn"
    return cmd_quantize(args)


class _Given(argparse.Action):
    """Store the value and remember that the option was given (RTN calibrates only when asked)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)
        namespace.samples_given = True


def _add_options(p: argparse.ArgumentParser, rtn: bool) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically; must not be the input)")
    add_config_args(p, GPTQConfig, exclude=GPTQ_ONLY if rtn else ())
    if rtn:
        p.add_argument("--log-errors", action="store_true",
                       help="also run calibration windows through the model to log each layer's output error "
                       "(as long as GPTQ takes; default: no calibration, seconds)")
    act = _Given if rtn else "store"
    p.add_argument("--samples", type=positive_int, default=128, action=act,
                   help="calibration windows" + (" (RTN: only with --log-errors)" if rtn else "")
                   + ". Default: %(default)s")
    p.add_argument("--seq-len", type=positive_int, default=512, action=act,
                   help="tokens per calibration window. Default: %(default)s")
    add_data_args(p, default_split="calibration")  # --data --field --split, calibration text
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows. Default: %(default)s")
    add_common_args(p)
    p.set_defaults(func=_cmd_rtn if rtn else _cmd_gptq, samples_given=False, log_errors=False)


EXAMPLES_GPTQ = ("examples:\n  llmcourse quantize gptq --model default --out out/gptq-4bit\n"
                 "  llmcourse quantize gptq --bits 3 --group-size 128 --desc-act --samples 32 --seq-len 256 "
                 "--out out/gptq-3bit\n  llmcourse eval perplexity --model out/gptq-4bit")
EXAMPLES_RTN = ("examples:\n  llmcourse quantize rtn --model default --out out/rtn-4bit\n"
                "  llmcourse quantize rtn --bits 3 --group-size 64 --asym --out out/rtn-3bit\n"
                "  llmcourse quantize rtn --log-errors --samples 32 --seq-len 256 --out out/rtn-logged")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.quant.gptq import LAB

    p = add_parser(
        sub, groups, LAB, "quantize gptq", epilog=EXAMPLES_GPTQ,
        description="Quantize the linear layers of every decoder block of --model with GPTQ, block by block on "
        "calibration windows that passed through the already quantized blocks, and write --out as a standard "
        "GPTQ checkpoint (int32-packed qweight, qzeros 'gptq' v1, fp16 scales, g_idx, quantize_config.json, "
        "config.json quantization_config) with the tokenizer, llmcourse.json and a per-layer error log "
        f"({LOG_FILE}). `llmcourse eval|generate|chat --model OUT` load it.")
    _add_options(p, rtn=False)
    p = add_parser(
        sub, groups, LAB, "quantize rtn", epilog=EXAMPLES_RTN,
        description="Round every weight of the decoder blocks' linear layers to the nearest point of GPTQ's grid "
        "(same --bits, --group-size, --asym) and write the same checkpoint format as `quantize gptq`. "
        "No calibration data is read unless --log-errors asks for each layer's output error.")
    _add_options(p, rtn=True)
