"""``llmcourse prune`` (unstructured / N:M / depth / width) and ``llmcourse distill``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmcourse.core.cli_common import (
    Result,
    add_common_args,
    add_data_args,
    add_model_args,
    model_kwargs,
    positive_int,
)
from llmcourse.core.data import calibration_windows, check_calibration
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model, save_hf

LOG_FILE = "prune_log.json"


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _add_calibration(p: argparse.ArgumentParser, samples: int, seq_len: int) -> None:
    p.add_argument("--samples", type=positive_int, default=samples, help="calibration windows. Default: %(default)s")
    p.add_argument("--seq-len", type=positive_int, default=seq_len,
                   help="tokens per calibration window. Default: %(default)s")
    add_data_args(p, default_split="calibration")  # --data --field --split, calibration text
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows. Default: %(default)s")


def _load_plain(spec: str, args: argparse.Namespace) -> Any:
    lm = load_model(spec, **model_kwargs(args))
    if lm.kind not in ("hf", "default", "hub", "gguf") or getattr(lm.model.config, "quantization_config", None):
        raise UserError(f"{spec} is quantized ({lm.kind})", "prune or distil the original floating-point model")
    return lm


def _windows(lm: Any, args: argparse.Namespace) -> Any:
    return calibration_windows(lm.tokenizer, args.samples, args.seq_len, seed=args.seed, data=args.data,
                               field=args.field, split=args.split)


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> Result:
    from llmcourse.compress.prune import PruneConfig, parse_nm

    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None, args.data])
    structured = args.layers is not None or args.width is not None
    if structured and (args.method or args.sparsity is not None or args.nm):
        raise UserError("--layers/--width (structured) and --method/--sparsity/--nm (unstructured) are two modes",
                        "run them as two commands, one on the other's output")
    if args.sparsity is not None and args.nm:
        raise UserError("--sparsity and --nm are two patterns", "choose one of them")
    cfg = None
    if not structured:
        cfg = PruneConfig(method=args.method or "wanda", sparsity=0.5 if args.sparsity is None else args.sparsity,
                          nm=parse_nm(args.nm) if args.nm else None, block_size=args.block_size, damp=args.damp,
                          scope=args.scope, bits=args.bits, true_sequential=args.true_sequential)
    if args.width is not None and not 0 < args.width < 1:
        raise UserError(f"--width must be in (0, 1) (got {args.width})", "pass the fraction of MLP neurons to keep, "
                        "e.g. --width 0.75")
    check_calibration(args.samples, args.seq_len)
    t0 = time.perf_counter()
    lm = _load_plain(args.model, args)
    if cfg is not None:
        data, text = _prune_unstructured(lm, args, cfg)
    else:
        data, text = _prune_structured(lm, args)
    report = {**data, "source": args.model, "data": {"data": args.data, "split": args.split, "samples": args.samples,
                                                      "seq_len": args.seq_len, "seed": args.seed}}
    with atomic_dir(out) as tmp:
        save_hf(lm.model, lm.tokenizer, tmp)
        (tmp / LOG_FILE).write_text(json.dumps(report, indent=1) + "\n")
    data.update(out=str(out), seconds=time.perf_counter() - t0, log=str(out / LOG_FILE))
    data.pop("layer_log", None)
    text += f"\nwrote {out} (log: {LOG_FILE}); evaluate it with: llmcourse eval compare --model {out} --reference " \
            f"{args.model}"
    return Result(data, text)


def _prune_unstructured(lm: Any, args: argparse.Namespace, cfg: Any) -> tuple[dict[str, Any], str]:
    from llmcourse.compress.prune import check_model, prune_model

    check_model(lm.model, cfg)
    windows = _windows(lm, args) if cfg.calibrated else None
    rep = prune_model(lm.model, windows, cfg)
    layers = rep["layers"]
    per_layer = {r["layer"]: round(r["sparsity"], 6) for r in layers}
    data = {"mode": "unstructured", "model": args.model, "scheme": cfg.name, "config": rep["config"],
            "sparsity": rep["sparsity"], "pruned_weights": rep["pruned_weights"], "block_weights": rep["block_weights"],
            "layer_sparsity": per_layer, "blocks": rep["blocks"], "prune_seconds": rep["seconds"],
            "layer_log": layers}
    if layers and "output_error" in layers[0]:
        data["output_error"] = sum(r["output_error"] for r in layers)
    lo = min(r["min_row_sparsity"] for r in layers)
    hi = max(r["max_row_sparsity"] for r in layers)
    bs = [b["sparsity"] for b in rep["blocks"]]
    text = (f"{cfg.name}: {rep['pruned_weights']:,} of {rep['block_weights']:,} block weights pruned "
            f"({rep['sparsity']:.2%}) in {rep['seconds']:.1f} s; per layer {min(per_layer.values()):.4f}.."
            f"{max(per_layer.values()):.4f}, per row {lo:.4f}..{hi:.4f}, per block {min(bs):.4f}..{max(bs):.4f} "
            f"(every layer in {LOG_FILE})")
    return data, text


def _prune_structured(lm: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from llmcourse.compress.structured import (
        choose_layers,
        drop_layers,
        layer_similarities,
        mlp_importance,
        n_parameters,
        parse_layers,
        shrink_mlp,
    )
    from llmcourse.core.modules import decoder_blocks

    model = lm.model
    n_layers = len(decoder_blocks(model)[1])
    before = n_parameters(model)
    data: dict[str, Any] = {"mode": "structured", "model": args.model, "parameters_before": before}
    parts = []
    if args.layers is not None:
        count, idx = parse_layers(args.layers, n_layers)
    windows = _windows(lm, args)
    if args.width is not None:
        imp = mlp_importance(model, windows)
        data["width"] = shrink_mlp(model, imp, args.width)
        parts.append(f"MLP {data['width']['intermediate_before']} -> {data['width']['intermediate_after']} neurons")
    if args.layers is not None:
        sims = None
        if idx is None:
            sims = layer_similarities(model, windows)
            idx = choose_layers(sims, count)
        data["depth"] = {**drop_layers(model, idx), "similarities": sims}
        parts.append(f"dropped layers {idx} ({n_layers} -> {n_layers - len(idx)})")
    after = n_parameters(model)
    data["parameters_after"] = after
    text = f"{'; '.join(parts)}: {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters"
    return data, text


EXAMPLES_PRUNE = """examples:
  llmcourse prune --method wanda --sparsity 0.5 --out out/wanda-50
  llmcourse prune --method sparsegpt --nm 2:4 --samples 32 --seq-len 512 --out out/sparsegpt-2-4
  llmcourse prune --method magnitude --sparsity 0.5 --out out/magnitude-50
  llmcourse prune --method sparsegpt --nm 2:4 --bits 4 --out out/sparsegpt-2-4-w4
  llmcourse prune --layers 8 --out out/depth-22       (drop the 8 most redundant of 30 layers)
  llmcourse prune --width 0.75 --out out/width-75     (keep 3/4 of every MLP's neurons)
  llmcourse eval compare --model out/wanda-50 --reference default"""


def _register_prune(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.compress import LAB

    p = add_parser(
        sub, groups, LAB, "prune", epilog=EXAMPLES_PRUNE,
        description="Prune --model and write --out as a plain Hugging Face folder (transformers and every lab load "
        "it) with a per-layer log. Unstructured or N:M: magnitude, Wanda (|W| x ||X||, per output row) or SparseGPT "
        "(the OBS update, GPTQ's lazy-batch Cholesky form), block by block on calibration windows that passed the "
        "already-pruned blocks. Structured: --layers drops whole decoder layers (highest input/output cosine "
        "similarity), --width shrinks every MLP to its most active neurons.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically; must not be the input)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default=None,
                   help="unstructured / N:M criterion. Default: wanda")
    p.add_argument("--sparsity", type=_float, default=None,
                   help="fraction of each row's weights set to zero, in (0, 1). Default: 0.5")
    p.add_argument("--nm", default=None, help="N:M pattern instead of --sparsity: N of every M consecutive weights "
                   "of a row pruned, e.g. 2:4")
    p.add_argument("--scope", choices=["row", "block"], default="row",
                   help="SparseGPT unstructured: choose the mask per row of each block of columns (exact sparsity "
                   "per row) or over the whole block (the reference code). Default: %(default)s")
    p.add_argument("--bits", type=int, default=0,
                   help="SparseGPT: also quantize the kept weights to this many bits (per-row asymmetric grid, stored "
                   "de-quantized), 0 for none. Default: %(default)s")
    p.add_argument("--block-size", type=positive_int, default=128,
                   help="SparseGPT's lazy block of columns. Default: %(default)s")
    p.add_argument("--damp", type=_float, default=0.01,
                   help="SparseGPT's dampening, a fraction of mean(diag H). Default: %(default)s")
    p.add_argument("--true-sequential", action="store_true",
                   help="collect each stage's statistics after the stages before it in the block are pruned "
                   "(default: one pass per block, as the references)")
    p.add_argument("--layers", default=None,
                   help="structured: drop this many decoder layers (those whose output is most similar to their "
                   "input), or the listed indices, e.g. 20,21,22")
    p.add_argument("--width", type=_float, default=None,
                   help="structured: keep this fraction of every MLP's neurons (by activation norm), e.g. 0.75")
    _add_calibration(p, 32, 512)
    add_common_args(p)
    p.set_defaults(func=cmd_prune)


# --------------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------------


def rank_layers(model: Any, windows: Any, count: int, criterion: str) -> tuple[list[int], list[float]]:
    """The ``count`` layers to drop and the scores they were chosen by: ``layer`` (each layer's input/output
    cosine similarity, the highest go) or ``block`` (Gromov et al.'s angular distance of a contiguous run)."""
    from llmcourse.compress.structured import block_distances, choose_block, choose_layers, layer_similarities

    if criterion == "block":
        dist = block_distances(model, windows, count)
        return choose_block(dist, count), dist
    sims = layer_similarities(model, windows)
    return choose_layers(sims, count), sims


def make_student(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The student: --student loaded as it is, or --student-from with --drop-layers / --width applied."""
    from llmcourse.compress.structured import (
        drop_layers,
        mlp_importance,
        parse_layers,
        shrink_mlp,
    )
    from llmcourse.core.modules import decoder_blocks

    if args.student:
        return _load_plain(args.student, args), {"student": args.student}
    spec = args.student_from
    lm = _load_plain(spec, args)  # a copy of its own: the teacher stays whole
    info: dict[str, Any] = {"student_from": spec}
    n_layers = len(decoder_blocks(lm.model)[1])
    count, idx = parse_layers(args.drop_layers, n_layers) if args.drop_layers else (0, None)
    if args.width is not None and not 0 < args.width < 1:
        raise UserError(f"--width must be in (0, 1) (got {args.width})", "pass e.g. --width 0.75")
    if count == 0 and args.width is None:
        raise UserError("--student-from needs --drop-layers and/or --width", "pass e.g. --drop-layers 8")
    windows = None
    if args.width is not None or (count and idx is None):
        windows = calibration_windows(lm.tokenizer, args.samples, args.calib_seq_len, seed=0, data=args.data,
                                      field=args.field, split="calibration")
    if args.width is not None:
        info["width"] = shrink_mlp(lm.model, mlp_importance(lm.model, windows), args.width)
    if count:
        scores = None
        if idx is None:
            idx, scores = rank_layers(lm.model, windows, count, args.drop_criterion)
        info["depth"] = {**drop_layers(lm.model, idx), "criterion": args.drop_criterion if scores else "indices",
                         "similarities" if args.drop_criterion == "layer" else "distances": scores}
    return lm, info


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(args: argparse.Namespace, rank: int, world: int, port: int, threads: int) -> None:
    """One process of a ``--processes`` run (forked): join the gloo group on 127.0.0.1 and run the command."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    args.processes, args.threads = 1, threads
    try:
        cmd_distill(args)
    except UserError as e:
        print(f"llmcourse: error: {e}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)


def _distill_processes(args: argparse.Namespace) -> Result:
    """Run this command in ``--processes`` CPU processes that join one gloo process group on 127.0.0.1
    (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun sets them); the global batch
    is kept (see ``llmcourse.compress.distill``). The processes are forked from this one before any model is
    loaded (no second start-up of Python, torch and transformers); if one fails, the others are stopped."""
    import multiprocessing

    import torch

    threads = args.threads or max(1, torch.get_num_threads() // args.processes)  # the chosen cores, shared out
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(args, r, args.processes, port, threads), daemon=True)
             for r in range(args.processes)]
    for p in procs:
        p.start()
    failed = None
    try:
        while failed is None and any(p.exitcode is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
            time.sleep(0.2)
        failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), failed)
    finally:
        for p in procs:  # a failed process leaves the others waiting in a collective: stop them
            if p.exitcode is None:
                p.terminate()
            p.join()
    if failed is not None:
        raise UserError(f"process {failed} of the {args.processes}-process run failed (exit {procs[failed].exitcode})",
                        "see its messages above")
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    return Result({**summary, "processes": args.processes},
                  f"{args.processes}-process distillation wrote {args.out}: held-out perplexity "
                  f"{summary['before']['eval_perplexity']:.2f} -> {summary['after']['eval_perplexity']:.2f}, "
                  f"{summary['tokens_per_s']:.0f} tokens/s")


def _init_distributed() -> int:
    """Join the process group torchrun set up (gloo); this process's rank (0 without torchrun)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return int(os.environ.get("RANK", "0"))


def _evals(row: dict[str, Any]) -> dict[str, float]:
    """The held-out measurements of a metrics row (the per-window lists stay in metrics.jsonl)."""
    return {k: v for k, v in row.items() if k.startswith("eval_") and not k.startswith("eval_window")}


def cmd_distill(args: argparse.Namespace) -> Result:
    import torch

    from llmcourse.compress.distill import (
        DistillConfig,
        check_pair,
        check_windows,
        distill_model,
        plot_curves,
        same_tokenizer,
        token_windows,
    )
    from llmcourse.compress.structured import n_parameters
    from llmcourse.core.cli_common import config_from_args
    from llmcourse.core.io import write_json

    if bool(args.student) == bool(args.student_from):
        raise UserError("pass exactly one of --student and --student-from", "e.g. --student-from default --drop-layers 8")
    if args.student and (args.drop_layers or args.width is not None):
        raise UserError("--drop-layers/--width shape a student made with --student-from", "drop them, or use "
                        "--student-from")
    cfg = config_from_args(DistillConfig, args)
    if cfg.batch_size < args.processes:
        raise UserError(f"--batch-size {cfg.batch_size} gives some of the {args.processes} processes no window",
                        f"use --batch-size {args.processes} or more")
    out = Path(args.out)
    inputs = [s for s in (args.teacher, args.student, args.student_from) if s and s != "default"]
    check_not_input(out, [*inputs, args.data if args.data != "default" else None])
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a rank of a --processes run: the launcher checked --out
    if not launched and args.resume is None and out.exists() and any(out.iterdir()) \
            and not getattr(args, "overwrite", False):
        raise UserError(f"--out {out} is not empty", "pass a new folder, --overwrite, or --resume it")
    if args.processes > 1:
        return _distill_processes(args)
    rank = _init_distributed()
    t0 = time.perf_counter()
    teacher = _load_plain(args.teacher, args)
    student, info = make_student(args)
    if not same_tokenizer(teacher.tokenizer, student.tokenizer):
        raise UserError("the teacher and the student have different vocabularies",
                        "distil into a student that shares the teacher's tokenizer")
    check_pair(teacher.model, student.model, cfg)
    train = token_windows(student.tokenizer, args.data, "train", cfg.seq_len, args.field)
    check_windows(train, cfg)
    held = token_windows(student.tokenizer, args.data, "eval", cfg.seq_len, args.field)[: cfg.eval_windows]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    n_student = n_parameters(student.model)
    res = distill_model(student.model, teacher.model, train, held, cfg, out, resume=args.resume,
                        meta={"teacher": args.teacher, **{k: v for k, v in info.items() if k != "depth"}})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank > 0:  # rank 0 writes the outputs and the report
        return Result({}, "")
    with atomic_dir(out / "student") as tmp:
        save_hf(res.student, student.tokenizer, tmp)
    plot_curves({cfg.loss: res.metrics}, out / "curves.png",
                f"{cfg.loss} {'distillation' if cfg.loss != 'lm' else 'training'} of a "
                f"{n_student / 1e6:.0f}M student ({args.teacher} teacher)")
    first, last = res.metrics[0], res.metrics[-1]
    summary = {"teacher": args.teacher, **info, "config": {**cfg.__dict__, "steps": cfg.steps},
               "student_parameters": n_student, "teacher_parameters": n_parameters(teacher.model),
               "steps": res.steps, "tokens": res.tokens, "train_seconds": res.seconds,
               "processes": int(os.environ.get("WORLD_SIZE", "1")),
               "tokens_per_s": res.tokens / max(res.seconds, 1e-9), "before": _evals(first), "after": _evals(last),
               "student": str(out / "student"), "seconds": time.perf_counter() - t0}
    write_json(out / "summary.json", summary)
    b, a = summary["before"], summary["after"]
    text = (f"{cfg.loss} ({cfg.method}) on {res.tokens:,} tokens in {res.steps} steps, {summary['tokens_per_s']:.0f} "
            f"tokens/s: held-out perplexity {b['eval_perplexity']:.2f} -> {a['eval_perplexity']:.2f}"
            + (f", KL to the teacher {b['eval_kl']:.3f} -> {a['eval_kl']:.3f}, top-1 {b['eval_top1']:.1%} -> "
               f"{a['eval_top1']:.1%}" if "eval_kl" in a else "")
            + f"\nwrote {out}: student/ ({n_student / 1e6:.1f}M parameters), metrics.jsonl, curves.png, checkpoints/,"
            f" summary.json\nnext: llmcourse eval compare --model {out / 'student'} --reference {args.teacher}")
    return Result(summary, text)


EXAMPLES_DISTILL = """examples:
  llmcourse distill --teacher default --student-from default --drop-layers 8 --tokens 65536 --out out/distill
  llmcourse distill --teacher default --student-from default --drop-layers 8 --loss lm --out out/lm-baseline
  llmcourse distill --teacher default --student out/depth-22 --loss mix --temperature 2 --method lora --out out/d2
  llmcourse distill --teacher default --student-from default --drop-layers 8 --ce-weight 0 --out out/kd
      (the teacher's distributions only; the default --ce-weight 0.5 also trains on the data's next tokens)
  llmcourse distill --teacher default --student-from default --drop-layers 8 --processes 2 --out out/ddp
  llmcourse distill --teacher default --student-from default --drop-layers 8 --out out/distill --resume out/distill"""


def _register_distill(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.compress import LAB
    from llmcourse.compress.distill import DistillConfig
    from llmcourse.core.cli_common import add_config_args

    p = add_parser(
        sub, groups, LAB, "distill", epilog=EXAMPLES_DISTILL,
        description="Distil --teacher into a student (--student, or --student-from the teacher with --drop-layers / "
        "--width) on the token stream of --data: forward KL, reverse KL or their mix at a temperature, averaged "
        "with the data's next-token cross-entropy (--ce-weight), optionally with a hidden-state loss; --loss lm trains the same student on the plain language-modelling loss (the "
        "baseline). Writes OUT/student (a Hugging Face folder), metrics.jsonl (held-out perplexity and KL to the "
        "teacher every --eval-every steps), curves.png, checkpoints/ (--resume OUT continues) and summary.json.")
    add_model_args(p, "--teacher", help_prefix="teacher model")
    p.add_argument("--student", default=None, help="student model (a folder or spec), used as it is")
    p.add_argument("--student-from", default=None, help="make the student from this model (usually the teacher) with "
                   "--drop-layers and/or --width")
    p.add_argument("--drop-layers", default=None, help="with --student-from: a count K (the K layers whose output is "
                   "most similar to their input) or indices, e.g. 20,21,22")
    p.add_argument("--drop-criterion", choices=["layer", "block"], default="layer",
                   help="with a --drop-layers count: drop the layers whose output is most similar to their input "
                   "(layer), or the contiguous run of layers with the smallest angular distance between its input "
                   "and output (block: Gromov et al. 2024). Default: %(default)s")
    p.add_argument("--width", type=_float, default=None, help="with --student-from: keep this fraction of every "
                   "MLP's neurons")
    p.add_argument("--samples", type=positive_int, default=16, help="calibration windows for choosing layers / "
                   "neurons. Default: %(default)s")
    p.add_argument("--calib-seq-len", type=positive_int, default=256, help="tokens per calibration window. "
                   "Default: %(default)s")
    p.add_argument("--data", default="default", help="training text ('default': the Wikipedia extracts' train split; "
                   "held-out windows from the eval split) or a .txt/.jsonl/.csv/.parquet file. Default: %(default)s")
    p.add_argument("--field", default=None, help="column / JSON key holding the text (default: 'text')")
    p.add_argument("--out", required=True, help="output folder (student/, metrics, curves, checkpoints)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint: an --out folder or its "
                   "checkpoints/step-N")
    add_config_args(p, DistillConfig)
    p.add_argument("--dtype", default="fp32", choices=["fp32"], help="compute dtype (default: fp32)")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="CPU processes (data parallel: one gloo process group on 127.0.0.1; the global batch is "
                   "kept: each process takes every N-th window of a step). Default: 1")
    add_common_args(p)
    p.set_defaults(func=cmd_distill, trust_pickle=False, trust_remote_code=False)


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    _register_prune(sub, groups)
    _register_distill(sub, groups)
