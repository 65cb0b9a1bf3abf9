"""A leaderboard: several models (fp32, int8, GPTQ, GGUF, fine-tuned...) on the same tokens and questions.

Per model: bytes on disk (the file, or the folder's files), perplexity on the default evaluation text (the
Hugging Face sliding-window recipe, :func:`llmcourse.core.evaluate.perplexity`), the mean
``KL(P_first || P_model)`` per token and the top-1 agreement against the *first* model
(:func:`llmcourse.core.evaluate.compare`), each task's score with its standard error (scored exactly as
``eval bench``: the same seeded documents for every model), and greedy decode speed in tokens/s (transformers'
``generate`` on the model as loaded, ``decode_tokens`` new tokens after a short prompt, one run after a warm-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.evaluation.runner import TaskResult, evaluate, headline
from llmcourse.evaluation.scoring import Scorer
from llmcourse.evaluation.tasks import TaskData


@dataclass
class LeaderboardConfig:
    """What ``eval leaderboard`` measures besides the tasks (validated here; flags generated from the fields)."""

    ppl_tokens: int = option(2048, "tokens of the default evaluation text for perplexity and KL", type=int)
    ppl_window: int = option(512, "perplexity window (stride: half of it)", type=int)
    decode_tokens: int = option(32, "new tokens of the greedy decode whose speed is reported (0: skip)", type=int)

    def __post_init__(self) -> None:
        if self.ppl_tokens < 2 or self.ppl_window < 2:
            raise UserError("--ppl-tokens and --ppl-window must be >= 2", "pass larger values")
        if self.decode_tokens < 0:
            raise UserError(f"--decode-tokens {self.decode_tokens} is negative", "pass 0 (skip) or more")


def bytes_on_disk(lm: Any) -> int | None:
    """Size of what was loaded: the file, or every file of the folder."""
    path = getattr(lm, "path", None)
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


@torch.inference_mode()
def decode_speed(lm: Any, n_tokens: int, prompt: str = "The capital of France is") -> float | None:
    """Greedy tokens/s of ``model.generate`` (one warm-up of 2 tokens, then ``n_tokens``)."""
    if n_tokens <= 0:
        return None
    tok, model = lm.tokenizer, lm.model
    ids = torch.tensor([tok.encode(prompt)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=pad)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def model_row(spec: str, lm: Any, ref: Any | None, ids: torch.Tensor, cfg: LeaderboardConfig,
              datas: list[TaskData], groups: dict[str, list[str]]) -> tuple[dict[str, Any], list[TaskResult]]:
    """One model's measurements (``ref`` is the first model's LoadedModel, None for the first itself)."""
    from llmcourse.core.evaluate import compare, perplexity

    ppl = perplexity(lm.model, ids, max_length=cfg.ppl_window, stride=max(1, cfg.ppl_window // 2))
    row: dict[str, Any] = {"model": spec, "kind": lm.kind, "bytes": bytes_on_disk(lm), "params": lm.n_params,
                           "perplexity": ppl["perplexity"]}
    if ref is None:
        row.update(kl=0.0, top1=1.0)
    else:
        if len(lm.tokenizer) != len(ref.tokenizer):
            raise UserError(f"{spec} and the first model have different vocabularies",
                            "put models that share a tokenizer on one leaderboard")
        c = compare(lm.model, ref.model, ids, max_length=cfg.ppl_window, max_tokens=None)
        row.update(kl=c["kl_divergence"], top1=c["top1_agreement"])
    _, results = evaluate(Scorer(lm.model, lm.tokenizer), datas, groups)
    shown = headline(results, groups)
    for r in shown:
        for m, v in r.metrics.items():
            row[f"{r.task} {m}"] = v
            row[f"{r.task} {m} se"] = r.stderr.get(m)
    n = sum(r.n for r in results if not r.members)
    secs = sum(r.seconds for r in results if not r.members)
    row["examples/s"] = n / secs if secs > 0 else None
    row["decode tok/s"] = decode_speed(lm, cfg.decode_tokens)
    return row, shown


def table(rows: list[dict[str, Any]], shown: list[TaskResult]) -> str:
    """Plain-text leaderboard: one line per model; task columns show the primary metric ± stderr (percent)."""
    cols = ["model", "MB", "ppl", "KL", "top-1"]
    metric = {r.task: ("acc_norm" if "acc_norm" in r.metrics else "acc") for r in shown}
    cols += [f"{t} ({m})" for t, m in metric.items()] + ["ex/s", "tok/s"]
    lines = [cols]
    for row in rows:
        cells = [str(row["model"]), "-" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}",
                 f"{row['perplexity']:.3f}", f"{row['kl']:.4f}", f"{100 * row['top1']:.1f}%"]
        for t, m in metric.items():
            v, se = row.get(f"{t} {m}"), row.get(f"{t} {m} se")
            cells.append("-" if v is None else f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else ""))
        cells.append("-" if row.get("examples/s") is None else f"{row['examples/s']:.2f}")
        cells.append("-" if row.get("decode tok/s") is None else f"{row['decode tok/s']:.1f}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(cols))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
