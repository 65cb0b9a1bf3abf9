"""A leaderboard: several models (fp32, int8, GPTQ, GGUF, fine-tuned...) on the same tokens and questions.

Per model: bytes on disk (the file, or the folder's files), perplexity on the default evaluation text (the
Hugging Face sliding-window recipe, :func:`llmcourse.core.evaluate.perplexity`), the mean
``KL(P_first || P_model)`` per token and the top-1 agreement against the *first* model
(:func:`llmcourse.core.evaluate.compare`), each task's score with its standard error (scored exactly as
``eval bench``: the same seeded documents for every model, ``--batch-size`` tokens per packed forward), and
greedy decode speed in tokens/s (transformers' ``generate`` on the model as loaded, ``decode_tokens`` new
tokens after a short prompt, one run after a warm-up).

**Resuming** (``--cache DIR``, :class:`ResultCache`): a leaderboard of seven models at 500 questions per task
is an hour or more of CPU, so each finished part is written at once, atomically, as one JSON file: a model's
measurements (``measures-<key>.json``: bytes, perplexity, KL, top-1, decode speed) and each task's scores
with its per-example log-likelihoods and metrics (``task-<name>-<key>.json``), under a folder per model
named by a hash of what identifies it (the spec, the resolved path, every file's size and modification
time, the dtype). The keys hash what the numbers depend on: a task's documents and rendered requests; the
perplexity settings and the reference model's identity for the measurements. A rerun with the same cache
loads finished parts instead of recomputing them (a model whose every part is there is not even loaded), so
a run cut short keeps what it finished, and adding a model or a task to a finished board costs only the new
parts. Scores do not depend on ``--batch-size`` (packing changes float summation order only), so it is not
part of the key.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.progress import progress
from llmcourse.evaluation.runner import TaskResult, group_result, score_task
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


# --- the cache of finished parts -----------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(spec: str, dtype: str, trust_pickle: bool = False) -> dict[str, Any]:
    """What identifies a model's numbers: the spec, its resolved path, each file's size and mtime (hidden files
    aside), the dtype (re-creating a folder or file changes the identity, so its cached parts are not reused)."""
    from llmcourse.core.models import resolve_model

    ms = resolve_model(spec, trust_pickle)
    files: list[tuple[str, int, int]] = []
    path = ms.path
    if path is not None:
        path = path.resolve()
        paths = [path] if path.is_file() else sorted(f for f in path.rglob("*")
                                                     if f.is_file() and not f.name.startswith("."))
        for f in paths:
            st = f.stat()
            files.append((str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns))
    return {"spec": spec, "kind": ms.kind, "path": str(path) if path else None, "dtype": dtype, "files": files}


def task_key(data: TaskData) -> str:
    """A task's cache key: its name and split, and a hash of the selected documents' ids, golds and requests."""
    t = data.task
    return f"task-{t.name}-" + _digest([t.name, t.split, data.n_docs,
                                          [(e.doc_id, e.gold, e.requests) for e in data.examples]])


CACHED_ONLY_FIX = "run without --cached-only to compute the parts, or point --cache at the folder an earlier run used"


class ResultCache:
    """Finished parts of a leaderboard as JSON files under ``root`` (``None``: a cache that keeps nothing)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise UserError(f"--cache {self.root} is a file", "pass a folder (it is created if missing)")

    def model_dir(self, identity: dict[str, Any]) -> Path | None:
        """The folder of one model's parts: a readable slug of its spec and the hash of its identity."""
        if self.root is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity["spec"]).strip("_.")[-60:] or "model"
        return self.root / f"{slug}-{_digest(identity)}"

    def get(self, folder: Path | None, name: str) -> dict[str, Any] | None:
        """A finished part, or None (missing, or unreadable: a part that cannot be read is computed again)."""
        if folder is None:
            return None
        try:
            return json.loads((folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, folder: Path | None, name: str, obj: dict[str, Any], identity: dict[str, Any]) -> None:
        """Write a finished part atomically (and, once per folder, ``model.json``: the identity it hashes)."""
        if folder is None:
            return
        from llmcourse.core.io import write_json

        if not (folder / "model.json").exists():
            write_json(folder / "model.json", identity)
        write_json(folder / f"{name}.json", obj)


# --- one model's row -----------------------------------------------------------------------------------------

def measure(lm: Any, ref: Any | None, ids: torch.Tensor, cfg: LeaderboardConfig, spec: str) -> dict[str, Any]:
    """Bytes on disk, perplexity, KL and top-1 agreement vs ``ref`` (None: this is the reference), decode speed."""
    from llmcourse.core.evaluate import compare, perplexity

    ppl = perplexity(lm.model, ids, max_length=cfg.ppl_window, stride=max(1, cfg.ppl_window // 2))
    m: dict[str, Any] = {"kind": lm.kind, "bytes": bytes_on_disk(lm), "params": lm.n_params,
                         "perplexity": ppl["perplexity"]}
    if ref is None:
        m.update(kl=0.0, top1=1.0)
    else:
        if len(lm.tokenizer) != len(ref.tokenizer):
            raise UserError(f"{spec} and the first model have different vocabularies",
                            "put models that share a tokenizer on one leaderboard")
        c = compare(lm.model, ref.model, ids, max_length=cfg.ppl_window, max_tokens=None)
        m.update(kl=c["kl_divergence"], top1=c["top1_agreement"])
    m["decode tok/s"] = decode_speed(lm, cfg.decode_tokens)
    return m


def slim_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a cached task keeps per example: enough for paired comparisons between models."""
    keys = ("doc_id", "gold", "lls", "is_greedy", "acc", "acc_norm", "acc_bytes")
    return [{k: r[k] for k in keys if k in r} for r in records]


def run(specs: list[str], datas: list[TaskData], groups: dict[str, list[str]], cfg: LeaderboardConfig,
        load: Callable[[str], Any], text_ids: Callable[[Any], torch.Tensor], batch_size: int = 1024,
        cache: ResultCache | None = None, dtype: str = "fp32", trust_pickle: bool = False,
        cached_only: bool = False) -> tuple[list[dict[str, Any]], dict[str, list[TaskResult]]]:
    """Every model's row (in ``specs`` order; the first is the KL reference) and its task results.

    ``load(spec)`` loads a model; ``text_ids(tokenizer)`` gives the perplexity text's token ids. With a
    ``cache``, finished parts are read from it and new ones written to it as soon as they finish; a model is
    loaded only if one of its parts is missing, the reference only for a missing KL. ``cached_only``: load and
    compute nothing, leave out the parts the cache does not hold (a long run's progress, from another shell); a
    cache that holds none of them is a :class:`UserError` naming them."""
    cache = cache or ResultCache(None)
    idents = [model_identity(s, dtype, trust_pickle) for s in specs]  # a bad spec fails before any work
    ident0 = idents[0]
    mkey = "measures-" + _digest([cfg.ppl_tokens, cfg.ppl_window, cfg.decode_tokens, ident0])
    state: dict[str, Any] = {"ref": None, "ids": None}

    def ref() -> Any:
        if state["ref"] is None:
            state["ref"] = load(specs[0])
        return state["ref"]

    def ids() -> torch.Tensor:
        if state["ids"] is None:
            state["ids"] = text_ids(ref().tokenizer)[:, :cfg.ppl_tokens]
        return state["ids"]

    rows: list[dict[str, Any]] = []
    series: dict[str, list[TaskResult]] = {}
    found = 0  # parts read from the cache
    for k, spec in enumerate(specs):
        ident = idents[k]
        folder = cache.model_dir(ident)
        loaded: dict[str, Any] = {}

        def model(k: int = k, spec: str = spec, loaded: dict[str, Any] = loaded) -> Any:
            if k == 0:
                return ref()
            if "lm" not in loaded:
                loaded["lm"] = load(spec)
            return loaded["lm"]

        m = cache.get(folder, mkey)
        found += m is not None
        if m is None and not cached_only:
            m = measure(model(), None if k == 0 else ref(), ids(), cfg, spec)
            cache.put(folder, mkey, m, ident)
        m = m or {}
        results: list[TaskResult] = []
        for d in datas:
            key = task_key(d)
            part = cache.get(folder, key)
            found += part is not None
            if part is None and cached_only:
                continue
            if part is None:
                lm = model()
                with progress(total=len(d.examples), desc=f"{d.task.name} ({spec})", unit="ex") as bar:
                    records, res = score_task(Scorer(lm.model, lm.tokenizer, max_tokens=batch_size), d, bar)
                part = {"result": asdict(res), "examples": slim_records(records)}
                cache.put(folder, key, part, ident)
            results.append(TaskResult(**part["result"]))
        by_name = {r.task: r for r in results}
        for g, members in groups.items():
            if all(n in by_name for n in members):
                results.append(group_result(g, [by_name[n] for n in members]))
        inside = {n for ms in groups.values() for n in ms}
        shown = [r for r in results if r.task not in inside]
        row: dict[str, Any] = {"model": spec, "kind": None, "bytes": None, "params": None, "perplexity": None,
                               "kl": None, "top1": None}
        row.update({k2: v for k2, v in m.items() if k2 != "decode tok/s"})
        for r in shown:
            for name, v in r.metrics.items():
                row[f"{r.task} {name}"] = v
                row[f"{r.task} {name} se"] = r.stderr.get(name)
        n = sum(r.n for r in results if not r.members)
        secs = sum(r.seconds for r in results if not r.members)
        row["examples/s"] = n / secs if secs > 0 else None
        row["decode tok/s"] = m.get("decode tok/s")
        if folder is not None:
            row["cache"] = str(folder)
        rows.append(row)
        series[spec] = shown
        loaded.clear()
    if cached_only and not found:
        parts = ", ".join(["measures"] + [d.task.name for d in datas])
        raise UserError(f"--cached-only: {cache.root} holds none of this leaderboard's parts (not cached: {parts} "
                        f"of {', '.join(specs)})", CACHED_ONLY_FIX)
    return rows, series


def table(rows: list[dict[str, Any]], shown: list[TaskResult]) -> str:
    """Plain-text leaderboard: one line per model; task columns (those of ``shown``) show the primary metric ±
    stderr (percent); ``-`` where a value is missing."""
    cols = ["model", "MB", "ppl", "KL", "top-1"]
    metric = {r.task: ("acc_norm" if "acc_norm" in r.metrics else "acc") for r in shown}
    cols += [f"{t} ({m})" for t, m in metric.items()] + ["ex/s", "tok/s"]
    lines = [cols]
    for row in rows:
        def cell(key: str, fmt: str, scale: float = 1.0, row: dict[str, Any] = row) -> str:
            v = row.get(key)
            return "-" if v is None else format(scale * v, fmt)

        cells = [str(row["model"]), cell("bytes", ".1f", 1e-6), cell("perplexity", ".3f"), cell("kl", ".4f"),
                 cell("top1", ".1%")]
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


def columns(series: dict[str, list[TaskResult]]) -> list[TaskResult]:
    """One result per task any model has, in first-seen order (the table's task columns)."""
    seen: dict[str, TaskResult] = {}
    for results in series.values():
        for r in results:
            seen.setdefault(r.task, r)
    return list(seen.values())
