"""CLI of the GGUF lab: ``convert gguf``, ``quantize gguf`` and ``imatrix``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from llmcourse.core.cli_common import Result, add_common_args, add_data_args
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input, expand_path
from llmcourse.core.lab import add_parser
from llmcourse.core.progress import progress

MODEL_HELP = ("model: 'default' (SmolLM2-135M-Instruct, offline), 'gemma3' (Gemma 3 270M, offline), "
              "a local Hugging Face folder (safetensors), "
              "a .gguf file, or a Hub id (needs network){}. Default: %(default)s")


def _add_model(p: argparse.ArgumentParser, gguf_ok: str = "") -> None:
    p.add_argument("--model", default="default", help=MODEL_HELP.format(gguf_ok))
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading pickle .bin/.pt checkpoints (can run arbitrary code: only for files you trust)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hub/folder model to run its own Python code (off by default)")


def _load(args: argparse.Namespace):
    from llmcourse.core.models import load_model

    return load_model(args.model, "fp32", trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code)


def _plain(lm: Any) -> tuple[Any, str]:
    """The model to write out: a lab's quantized model de-quantized first (its loader says how), and a note."""
    dequantize = lm.info.get("dequantize")
    if dequantize is None:
        return lm.model, ""
    return dequantize(), f"; de-quantized the {lm.kind} model to fp32 first"


def _folder(lm: Any) -> Path | None:
    return lm.path if lm.path is not None and Path(lm.path).is_dir() else None


# ---------------------------------------------------------------------------------------------

def _check_convertible(spec: str) -> None:
    """Refuse a model folder whose ``config.json`` names an architecture the converter does not know,
    before loading it (one line naming the supported model types)."""
    import json

    from llmcourse.quant.gguf.names import model_arch

    config = Path(spec).expanduser() / "config.json"
    if not config.is_file():
        return  # 'default', a GGUF file, a Hub id: checked once loaded
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # the loader reports a broken config
    if isinstance(cfg, dict):
        model_arch(cfg.get("model_type"), f"{config.parent.name}: model")


def cmd_convert_gguf(args: argparse.Namespace) -> Result:
    from llmcourse.quant.gguf.convert import convert_to_gguf as convert

    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None])
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder", "pass a file path ending in .gguf")
    _check_convertible(args.model)
    t0 = time.perf_counter()
    lm = _load(args)
    model, note = _plain(lm)
    bar = progress(total=None, desc="convert", unit="tensor")
    info = convert(model, lm.tokenizer, out, args.outtype, args.name, _folder(lm), args.tokenizer_pre,
                   lambda _t: bar.update(1))
    bar.close()
    info.update(model=args.model, seconds=time.perf_counter() - t0)
    text = (f"wrote {out} ({info['bytes'] / 1e6:.1f} MB, {info['architecture']}, {args.outtype}, "
            f"{info['tensors']} tensors) in {info['seconds']:.1f} s{note}")
    info["dequantized"] = bool(note)
    return Result(info, text)


def _check_hub(repo: str) -> None:
    """Fail before any work when the Hub cannot be reached or the login is missing."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub", "pip install huggingface_hub") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"cannot push to {repo}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE and retry online")
    try:
        HfApi().whoami()
    except Exception as e:  # huggingface_hub raises requests/httpx/its own errors; all mean "cannot push"
        raise UserError(f"cannot push to {repo}: the Hugging Face Hub is not reachable or you are not logged in "
                        f"({type(e).__name__})", "run `hf auth login` online, or drop --push-to-hub") from None


def _push(repo: str, files: list[Path]) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    for f in files:
        api.upload_file(path_or_fileobj=str(f), path_in_repo=f.name, repo_id=repo)
    return f"https://huggingface.co/{repo}"


def cmd_quantize_gguf(args: argparse.Namespace) -> Result:
    from llmcourse.quant.gguf.convert import from_hf
    from llmcourse.quant.gguf.presets import fallback_note, get_preset, quantize_gguf

    presets = [get_preset(t.strip(), args.pure) for t in args.type.split(",") if t.strip()]
    if not presets:
        raise UserError("--type is empty", "pass e.g. --type Q4_K_M,Q8_0")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file", "pass a folder (one .gguf per type is written into it)")
    src_path = expand_path(args.model)
    inputs = [args.model if args.model != "default" else None, args.imatrix]
    check_not_input(out_dir, inputs)
    if args.push_to_hub:
        _check_hub(args.push_to_hub)
    imatrix = None
    if args.imatrix:
        from llmcourse.quant.gguf import imatrix as im

        imatrix = im.load(args.imatrix).quant_weights()
    t0 = time.perf_counter()
    if src_path.is_file() and args.model.lower().endswith(".gguf"):
        source: Any = src_path
        stem = src_path.stem
        for sep in ("-", "_", "."):
            for suffix in ("f32", "F32", "f16", "F16", "bf16", "BF16"):
                stem = stem.removesuffix(sep + suffix)
    else:
        lm = _load(args)
        source = from_hf(_plain(lm)[0], lm.tokenizer, "f32", None, _folder(lm), args.tokenizer_pre)
        stem = _folder(lm).name if _folder(lm) is not None else "model"
    rows, files = [], []
    with atomic_dir(out_dir) as tmp:  # the folder appears whole, with every type, or not at all
        for p in presets:
            name = f"{stem}-{p.name}.gguf"
            bar = progress(total=None, desc=f"quantize {p.name}", unit="tensor")
            t1 = time.perf_counter()
            info = quantize_gguf(source, tmp / name, p, imatrix=imatrix, progress=lambda _t, bar=bar: bar.update(1))
            bar.close()
            info["seconds"] = time.perf_counter() - t1
            info["out"] = str(out_dir / name)
            rows.append(info)
            files.append(out_dir / name)
    data: dict[str, Any] = {"model": args.model, "out": str(out_dir), "files": rows,
                            "imatrix": args.imatrix, "seconds": time.perf_counter() - t0}
    lines = [f"{'type':8} {'MB':>8} {'bits/w':>7} {'s':>6}  file"]
    lines += [f"{r['preset']:8} {r['bytes'] / 1e6:8.1f} {r['bits_per_weight']:7.3f} {r['seconds']:6.1f}  {r['out']}"
              for r in rows]
    lines += [note + "." for note in (fallback_note(r) for r in rows) if note]
    if args.push_to_hub:
        data["pushed_to"] = _push(args.push_to_hub, files)
        lines.append(f"pushed {len(files)} file(s) to {data['pushed_to']}")
    return Result(data, "\n".join(lines))


def cmd_imatrix(args: argparse.Namespace) -> Result:
    from llmcourse.core.data import calibration_windows, check_calibration
    from llmcourse.quant.gguf import imatrix as im

    check_calibration(args.chunks, args.chunk_size)
    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None, args.data if args.data != "default" else None])
    t0 = time.perf_counter()
    lm = _load(args)
    from llmcourse.core.evaluate import context_length

    ctx = context_length(lm.model)
    if ctx is not None and args.chunk_size > ctx:
        raise UserError(f"--chunk-size {args.chunk_size} exceeds the model's context of {ctx} tokens",
                        f"use --chunk-size {ctx} or less")
    split = args.split if args.data == "default" else "all"
    windows = calibration_windows(lm.tokenizer, args.chunks, args.chunk_size, args.seed, args.data, args.field, split)
    bar = progress(total=len(windows), desc="imatrix", unit="chunk")

    def tick(it):
        for w in it:
            yield w
            bar.update(1)

    result = im.collect(lm.model, windows, process_output=args.process_output,
                        dataset=args.data if args.data != "default" else "wikipedia-extracts", progress=tick)
    bar.close()
    im.save(result, out, legacy=args.format == "dat")
    data = {"model": args.model, "out": str(out), "entries": len(result.entries), "chunks": result.chunk_count,
            "chunk_size": result.chunk_size, "format": args.format, "seconds": time.perf_counter() - t0}
    return Result(data, f"wrote {out}: {data['entries']} tensors from {data['chunks']} chunks of "
                        f"{data['chunk_size']} tokens in {data['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------

EXAMPLES = {
    "convert gguf": "examples:\n  llmcourse convert gguf --model default --dtype f16 --out out/smollm2-f16.gguf",
    "quantize gguf": "examples:\n  llmcourse quantize gguf --model out/smollm2-f32.gguf --type Q4_K_M,Q8_0 --out out/gguf\n"
                     "  llmcourse quantize gguf --model default --type Q4_K_M --imatrix out/imatrix.gguf --out out/gguf",
    "imatrix": "examples:\n  llmcourse imatrix --model default --out out/imatrix.gguf\n"
               "  llmcourse imatrix --model default --data notes.txt --chunks 16 --chunk-size 256 --out out/im.gguf",
}


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.quant.gguf import LAB
    from llmcourse.quant.gguf.presets import PRESETS

    pc = add_parser(
        sub, groups, LAB, "convert gguf", epilog=EXAMPLES["convert gguf"],
        description="Write --model as a GGUF file llama.cpp runs: tensor names, the q/k permutation, "
        "hyperparameters, tokenizer and chat template as llama.cpp's converter writes them. Model types: "
        "llama (Llama 2/3, SmolLM2), mistral, smollm3, qwen2 (Qwen2.5), qwen3, gemma3_text, phi3 (Phi-3/Phi-4), "
        "gpt2; byte-level BPE tokenizers only.")
    _add_model(pc)
    pc.add_argument("--dtype", "--outtype", dest="outtype", default="f32", choices=["f32", "f16", "bf16"],
                    help="type of the weight matrices in the file; norms stay f32 (default: %(default)s)")
    pc.add_argument("--out", required=True, help="output .gguf file (written atomically; must not be the input)")
    pc.add_argument("--name", default=None, help="general.name (default: from the model folder's name)")
    pc.add_argument("--tokenizer-pre", default=None,
                    help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it is not recognised, "
                    "e.g. llama-bpe, qwen2, smollm, gpt-2")
    add_common_args(pc)
    pc.set_defaults(func=cmd_convert_gguf)

    pq = add_parser(
        sub, groups, LAB, "quantize gguf", epilog=EXAMPLES["quantize gguf"],
        description="Quantize --model (a GGUF file, or any model: converted to F32 first) with llama.cpp's "
        "per-tensor rules, byte for byte what llama-quantize writes from the same F32 file.")
    _add_model(pq, gguf_ok="; from an F32/F16/BF16 .gguf the files are llama.cpp's exact bytes")
    pq.add_argument("--type", required=True,
                    help=f"comma-separated presets or tensor types: {', '.join(PRESETS)}. Q3_K, Q4_K, Q5_K are "
                    "one type everywhere (llama-quantize --pure)")
    pq.add_argument("--out", required=True, help="output folder, one NAME-TYPE.gguf per type (written atomically: all types or nothing)")
    pq.add_argument("--imatrix", default=None,
                    help="importance matrix (.gguf or legacy .dat from `llmcourse imatrix` or llama-imatrix)")
    pq.add_argument("--pure", action="store_true",
                    help="no per-tensor rules: every quantizable tensor gets the preset's default type")
    pq.add_argument("--tokenizer-pre", default=None,
                    help="llama.cpp pre-tokenizer name when converting a model whose tokenizer is not recognised")
    pq.add_argument("--push-to-hub", metavar="REPO", default=None,
                    help="upload the files to this Hugging Face Hub repo (needs network and a login; checked "
                    "before any work)")
    add_common_args(pq)
    pq.set_defaults(func=cmd_quantize_gguf)

    pi = add_parser(
        sub, groups, LAB, "imatrix", epilog=EXAMPLES["imatrix"],
        description="Run the model over calibration windows with forward hooks and write llama.cpp's importance "
        "matrix (GGUF by default, or the legacy .dat), which `quantize gguf --imatrix` and llama-quantize read.")
    _add_model(pi)
    add_data_args(pi, default_split="calibration")
    pi.add_argument("--out", required=True, help="output imatrix file (written atomically)")
    pi.add_argument("--chunks", type=int, default=32, help="number of calibration windows (default: %(default)s)")
    pi.add_argument("--chunk-size", type=int, default=512, help="tokens per window (default: %(default)s)")
    pi.add_argument("--seed", type=int, default=0, help="seed of the window sampler (default: %(default)s)")
    pi.add_argument("--process-output", action="store_true", help="also collect output.weight (as llama-imatrix)")
    pi.add_argument("--format", choices=["gguf", "dat"], default="gguf",
                    help="file format: llama.cpp's GGUF imatrix or the legacy .dat (default: %(default)s)")
    add_common_args(pi)
    pi.set_defaults(func=cmd_imatrix)
