"""Run tasks on a model: score every example, aggregate like lm-eval, write the per-example JSONL, the table
and the bar plot (error bars = one standard error).

A task's score is the mean of its per-example metrics with lm-eval's ``mean_stderr``; a group (``mmlu``) is
the size-weighted mean of its subjects with the pooled standard error (see :mod:`.scoring`). Throughput is
examples per second of scoring (tokenisation included, model loading and data reading excluded).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.progress import progress
from llmcourse.evaluation.scoring import Scorer, choice_metrics, mean_stderr, pooled_stderr
from llmcourse.evaluation.tasks import TaskData, build, resolve


@dataclass
class TaskResult:
    """A task's (or group's) scores."""

    task: str
    split: str
    n: int  # examples scored
    n_docs: int  # documents in the split
    metrics: dict[str, float] = field(default_factory=dict)  # acc, acc_norm
    stderr: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    examples_per_s: float = 0.0
    members: list[str] = field(default_factory=list)  # a group's tasks


def score_task(scorer: Scorer, data: TaskData, bar: Any = None) -> tuple[list[dict[str, Any]], TaskResult]:
    """Score every example of ``data``: per-example records and the task's result."""
    t0 = time.perf_counter()
    encoded = [scorer.encode(ex.requests) for ex in data.examples]
    all_scored = scorer.score_many(encoded, on_done=bar.update if bar is not None else None)
    records = []
    for ex, scored in zip(data.examples, all_scored, strict=True):
        lls = [s.ll for s in scored]
        m = choice_metrics(lls, ex.choices, ex.gold)
        records.append({
            "task": ex.task, "doc_id": ex.doc_id, "gold": ex.gold, "lls": lls,
            "is_greedy": [s.is_greedy for s in scored], "cont_tokens": [s.n_tokens for s in scored],
            "choice_chars": [len(c) for c in ex.choices], **m,
            "context": ex.requests[0][0] if len({r[0] for r in ex.requests}) == 1 else [r[0] for r in ex.requests],
            "continuations": [r[1] for r in ex.requests],
        })
    secs = time.perf_counter() - t0
    task = data.task
    res = TaskResult(task.name, task.split, len(records), data.n_docs, seconds=secs,
                     examples_per_s=len(records) / secs if secs > 0 else 0.0)
    for metric in task.metrics:
        vals = [r[metric] for r in records]
        res.metrics[metric] = sum(vals) / len(vals)
        res.stderr[metric] = mean_stderr(vals)
    return records, res


def group_result(name: str, members: list[TaskResult]) -> TaskResult:
    """A group's acc: the size-weighted mean of its members, with lm-eval's pooled standard error."""
    sizes = [m.n for m in members]
    res = TaskResult(name, members[0].split, sum(sizes), sum(m.n_docs for m in members),
                     seconds=sum(m.seconds for m in members), members=[m.task for m in members])
    res.examples_per_s = res.n / res.seconds if res.seconds > 0 else 0.0
    for metric in members[0].metrics:
        res.metrics[metric] = sum(m.metrics[metric] * m.n for m in members) / res.n
        ses = [m.stderr[metric] for m in members]
        res.stderr[metric] = pooled_stderr(ses, sizes) if all(s is not None for s in ses) and \
            res.n > len(members) else None  # type: ignore[arg-type]
    return res


def evaluate(scorer: Scorer, datas: list[TaskData], groups: dict[str, list[str]] | None = None,
             ) -> tuple[list[dict[str, Any]], list[TaskResult]]:
    """Score every task; results hold each task, then each group asked for."""
    records: list[dict[str, Any]] = []
    results: list[TaskResult] = []
    with progress(total=sum(len(d.examples) for d in datas), desc="scoring", unit="ex") as bar:
        for d in datas:
            recs, res = score_task(scorer, d, bar)
            records += recs
            results.append(res)
    by_name = {r.task: r for r in results}
    for g, members in (groups or {}).items():
        results.append(group_result(g, [by_name[m] for m in members]))
    return records, results


def headline(results: list[TaskResult], groups: dict[str, list[str]] | None = None) -> list[TaskResult]:
    """The rows a summary shows: groups instead of their members."""
    inside = {m for ms in (groups or {}).values() for m in ms}
    return [r for r in results if r.task not in inside]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def results_table(results: list[TaskResult]) -> str:
    """A plain-text table: task, split, n, acc ± stderr, acc_norm ± stderr (percent), examples/s."""
    rows = [("task", "split", "n", "acc", "± se", "acc_norm", "± se", "ex/s")]
    for r in results:
        rows.append((r.task, r.split, str(r.n), _pct(r.metrics.get("acc")), _pct(r.stderr.get("acc")),
                     _pct(r.metrics.get("acc_norm")), _pct(r.stderr.get("acc_norm")), f"{r.examples_per_s:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def bar_plot(series: dict[str, list[TaskResult]], path: Path, title: str) -> None:
    """Grouped bars of each task's primary metric (acc_norm where reported, else acc), one colour per series
    (model), error bars of one standard error."""
    from llmcourse.core.report import pyplot

    plt = pyplot()
    names = list(series)
    tasks = [r.task for r in series[names[0]]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(names)) ** 0.5 + 2), 3.6))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        rows = {r.task: r for r in series[name]}
        vals, errs = [], []
        for t in tasks:
            r = rows.get(t)
            metric = "acc_norm" if r is not None and "acc_norm" in r.metrics else "acc"
            vals.append(100 * r.metrics[metric] if r else 0.0)
            se = r.stderr.get(metric) if r else None
            errs.append(100 * se if se is not None else 0.0)
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({'acc_norm' if 'acc_norm' in series[names[0]][i].metrics else 'acc'})"
                        for i, t in enumerate(tasks)], fontsize=8)
    ax.set_ylabel("score (%) ± 1 s.e.")
    ax.set_title(title, fontsize=9)
    if len(names) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(tmp: Path, records: list[dict[str, Any]], results: list[TaskResult], meta: dict[str, Any],
                  shown: list[TaskResult]) -> list[str]:
    """Into ``tmp`` (an atomic folder): examples.jsonl, results.json, results.txt, scores.png."""
    with open(tmp / "examples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp / "results.json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    (tmp / "results.txt").write_text(results_table(shown) + "\n")
    bar_plot({meta.get("model", "model"): shown}, tmp / "scores.png", f"{meta.get('model')}: "
             f"{meta.get('num_fewshot', 0)}-shot" + (f", limit {meta['limit']} (seed {meta['seed']})"
                                                     if meta.get("limit") else ""))
    return ["examples.jsonl", "results.json", "results.txt", "scores.png"]


@dataclass
class BenchConfig:
    """What ``eval bench`` runs (validated here; the CLI flags are generated from these fields)."""

    tasks: str = option("hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu5",
                        "comma-separated tasks: hellaswag, arc_easy, arc_challenge, piqa, winogrande, mmlu (57 "
                        "subjects), mmlu5 (5 subjects), mmlu_<subject>")
    limit: int | None = option(None, "score a seeded sample of this many documents per task (MMLU: per subject) "
                               "instead of all", type=int)
    seed: int = option(1234, "seed of the --limit sample", type=int)
    num_fewshot: int = option(0, "few-shot examples in each context (MMLU only: the first K of its dev split)",
                              type=int)
    batch_size: int = option(1024, "most tokens in one forward (rows x width, padding included): questions, "
                             "each written once as a tree of its choices, are packed up to this size; models the "
                             "packed path cannot run score one question per forward (prefix K/V cache, then its "
                             "choices as one batch)", type=int)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} scores nothing", "pass --limit >= 1, or leave it out for "
                            "every document")
        if self.num_fewshot < 0:
            raise UserError(f"--num-fewshot {self.num_fewshot} is negative", "pass 0 or more")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be >= 1", "pass --batch-size 1 or more")


def prepare(cfg: BenchConfig) -> tuple[list[TaskData], dict[str, list[str]]]:
    """The tasks' selected examples (reading and checking the data, before any model is loaded)."""
    tasks, groups = resolve(cfg.tasks)
    return [build(t, cfg.limit, cfg.seed, cfg.num_fewshot) for t in tasks], groups
