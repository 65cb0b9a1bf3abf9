"""Tour section of the evaluation lab: the default model on a seeded sample of each benchmark, scored as
lm-evaluation-harness 0.4.13 scores it, with one-standard-error bars."""

from __future__ import annotations

from llmcourse.core.report import TourContext, TourSection, html_table, img
from llmcourse.evaluation.runner import bar_plot, evaluate, headline
from llmcourse.evaluation.scoring import Scorer
from llmcourse.evaluation.tasks import build, resolve


def section(ctx: TourContext) -> TourSection:
    """Quick mode: 4 documents of ARC-Easy and PIQA; full: 50 of each task and 10 per MMLU5 subject (about a
    minute on 2 cores: the tour's budget; the error bars say how little that sample separates)."""
    if ctx.quick:
        names, limit, mmlu_limit = "arc_easy,piqa", 4, 4
    else:
        names, limit, mmlu_limit = "hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu5", 50, 10
    tasks, groups = resolve(names)
    datas = [build(t, mmlu_limit if t.group else limit, seed=1234) for t in tasks]
    lm = ctx.lm
    records, results = evaluate(Scorer(lm.model, lm.tokenizer), datas, groups)
    shown = headline(results, groups)
    bar_plot({"default (fp32)": shown}, ctx.out_dir / "evaluation_scores.png",
             f"default model, 0-shot, seeded sample (seed 1234, {limit} per task)")
    rows = []
    for r in shown:
        row = {"task": r.task, "split": r.split, "n": r.n}
        for m in ("acc", "acc_norm"):
            v, se = r.metrics.get(m), r.stderr.get(m)
            row[m] = "-" if v is None else f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v:.1f}"
        row["examples/s"] = round(r.examples_per_s, 2)
        rows.append(row)
    n = sum(r.n for r in results if not r.members)
    secs = sum(r.seconds for r in results if not r.members)
    html = "\n".join([
        "<p>The benchmarks people quote, offline: each question's prompt, choices and gold answer as "
        "lm-evaluation-harness 0.4.13 defines them, each choice's log-likelihood after lm-eval's tokenisation of "
        "the request, <code>acc</code> (largest log-likelihood) and <code>acc_norm</code> (divided by the choice's "
        "length in characters). Each question is written once as a tree of its choices (the shared context once, "
        "each choice attending to it and to itself only) and many questions run in one forward. A seeded sample keeps the tour short: the error bars (one standard error, "
        "sqrt(p(1-p)/n)) show how little a small sample can tell apart.</p>",
        html_table(rows),
        f"<p class=\"muted\">{n} examples in {secs:.1f} s ({n / secs:.2f} examples/s). "
        "Run <code>llmcourse eval bench --help</code> for full splits, and <code>llmcourse eval leaderboard</code> "
        "to compare quantized models.</p>",
        img("evaluation_scores.png", "benchmark scores with error bars"),
    ])
    summary = {"results": [{"task": r.task, "n": r.n, "metrics": r.metrics, "stderr": r.stderr} for r in shown],
               "examples": n, "examples_per_s": n / secs if secs else None}
    return TourSection("Benchmarks: HellaSwag, ARC, PIQA, Winogrande, MMLU as lm-eval scores them", html, summary)
