"""Knowledge distillation of a (pruned) student from its teacher (Hinton, Vinyals, Dean 2015; for LLMs,
Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation").

On every training token ``t`` the teacher's and student's next-token distributions at temperature ``τ``,
``p = softmax(z_T / τ)`` and ``q = softmax(z_S / τ)``, give the losses (nats per token, times ``τ²`` so the
gradient scale does not shrink with ``τ``, as Hinton et al.):

    forward KL   KL(p || q) = Σ_v p_v (log p_v - log q_v)      mass-covering: q must cover all of p
    reverse KL   KL(q || p) = Σ_v q_v (log q_v - log p_v)      mode-seeking (MiniLLM, Gu et al. 2024)
    mix          β KL(p || q) + (1 - β) KL(q || p)
    lm           -log q_{x_{t+1}} at τ = 1                      no teacher: the plain language-modelling loss

and, with ``ce_weight`` ``a > 0``, Hinton et al.'s weighted average of the soft and the hard targets,
``(1 - a) · τ² · KD + a · CE`` (CE: the ``lm`` loss on the same tokens; DistilBERT and MiniLLM's baselines
mix them the same way),

plus, optionally, ``w_h · ||h_S - h_T||² / H`` on the last hidden states (Minitron's intermediate-state loss,
here on the final one, which a depth- or width-pruned student shares with its teacher in size).

Data: the text (``core.data``) as one token stream cut into windows of ``seq_len`` tokens, every window
full, so a batch needs no padding (the padding-free batch of the fine-tuning lab with one example per row).
The *token budget* fixes the number of optimizer steps: ``ceil(tokens / (batch · seq_len))``. AdamW with the
fine-tuning lab's cosine schedule and checkpoints (``checkpoints/step-N``: trainable weights, AdamW moments,
RNG; ``--resume`` continues the same run: the window order depends only on the seed and the step).
Every ``eval_every`` steps the student is measured on held-out windows: perplexity, and KL(teacher ||
student) and top-1 agreement at ``τ = 1`` — the curves in ``metrics.jsonl`` and ``curves.png`` — with each
window's mean NLL and KL kept, so that two runs on the same windows compare by the mean and standard error
of their per-window differences (``paired_gap``).

Data parallel (``llmcourse distill --processes N``, or torchrun; gloo on CPUs): process ``r`` of ``W`` takes
rows ``r, r + W, ...`` of every step's batch and weights its mean loss by its share of the rows, gradients are
summed over processes (``all_reduce``) before clipping, so the update is the single-process update with the
same global batch; the held-out windows are split the same way and their sums reduced.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.progress import progress

log = logging.getLogger(__name__)

LOSSES = ("forward", "reverse", "mix", "lm")


@dataclass
class DistillConfig:
    """How to distil; validated here, at the boundary."""

    loss: str = option("forward", "forward KL(teacher || student), reverse KL(student || teacher), their mix, or "
                       "lm (no teacher: the plain language-modelling loss, the baseline)", choices=list(LOSSES))
    mix: float = option(0.5, "mix: weight of the forward KL (the reverse KL gets 1 - it)")
    temperature: float = option(1.0, "softmax temperature of both distributions (the loss is scaled by T²)")
    ce_weight: float = option(0.5, "weight a of the hard-label cross-entropy: (1 - a) KD + a CE (Hinton et al.'s "
                              "weighted average; 0: the teacher's distributions only, which trailed the LM loss in "
                              "held-out perplexity: docs/compression.md)")
    hidden_weight: float = option(0.0, "weight of the MSE between the last hidden states (0: logits only)")
    method: str = option("full", "train every weight (full) or LoRA adapters, merged at the end",
                         choices=["full", "lora"])
    tokens: int = option(65536, "token budget: optimizer steps = ceil(tokens / (batch-size x seq-len))")
    batch_size: int = option(4, "windows per optimizer step")
    seq_len: int = option(256, "tokens per window")
    lr: float = option(1e-4, "peak learning rate (AdamW, cosine schedule with warmup)")
    warmup_ratio: float = option(0.05, "fraction of the steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)")
    eval_every: int = option(4, "measure held-out perplexity and KL every N steps (and at the start and end)")
    eval_windows: int = option(8, "held-out windows (of seq-len tokens) for those measurements")
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    seed: int = option(0, "seed of the window order and of LoRA's initialisation")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}", f"use one of {', '.join(LOSSES)}")
        if not 0 <= self.ce_weight <= 1:
            raise UserError(f"--ce-weight must be in [0, 1] (got {self.ce_weight})", "pass e.g. --ce-weight 0.5")
        if not 0 <= self.mix <= 1:
            raise UserError(f"--mix must be in [0, 1] (got {self.mix})", "pass e.g. --mix 0.5")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"--temperature must be > 0 (got {self.temperature})", "pass e.g. --temperature 1")
        if self.hidden_weight < 0:
            raise UserError(f"--hidden-weight must be >= 0 (got {self.hidden_weight})", "pass 0 or e.g. 1")
        if self.method not in ("full", "lora"):
            raise UserError(f"unknown --method {self.method!r}", "use full or lora")
        for k in ("tokens", "batch_size", "seq_len", "eval_windows"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(self, k)})", "raise it")
        if self.seq_len < 2:
            raise UserError("--seq-len must be >= 2", "raise it")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1:
            raise UserError("--lr must be > 0 and --warmup-ratio in [0, 1)", "pass e.g. --lr 1e-4 --warmup-ratio 0.05")
        if self.eval_every < 0 or self.save_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UserError("--eval-every, --save-every, --max-grad-norm and --weight-decay must be >= 0", "fix them")

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "forward", temperature: float = 1.0,
            mix: float = 0.5) -> torch.Tensor:
    """Mean distillation loss per position of logits (N, V) (see the module docstring), times ``τ²``."""
    ls = F.log_softmax(student.float() / temperature, -1)
    lt = F.log_softmax(teacher.float() / temperature, -1)
    total = torch.zeros((), dtype=torch.float32)
    if kind in ("forward", "mix"):
        fwd = (lt.exp() * (lt - ls)).sum(-1).mean()
        total = total + (mix if kind == "mix" else 1.0) * fwd
    if kind in ("reverse", "mix"):
        rev = (ls.exp() * (ls - lt)).sum(-1).mean()
        total = total + ((1 - mix) if kind == "mix" else 1.0) * rev
    return total * temperature ** 2


def check_pair(teacher: nn.Module, student: nn.Module, cfg: DistillConfig) -> None:
    """A one-line error unless the student can learn from the teacher's distributions (same vocabulary)."""
    vt = teacher.get_output_embeddings().weight.shape[0]
    vs = student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise UserError(f"the teacher has a vocabulary of {vt} tokens and the student {vs}: their distributions "
                        "cannot be compared", "distil into a student with the teacher's tokenizer (e.g. --student-from "
                        "the teacher)")
    if cfg.hidden_weight > 0 and teacher.config.hidden_size != student.config.hidden_size:
        raise UserError(f"--hidden-weight needs equal hidden sizes (teacher {teacher.config.hidden_size}, student "
                        f"{student.config.hidden_size})", "drop --hidden-weight")


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary and special tokens)."""
    return a.get_vocab() == b.get_vocab()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def token_windows(tokenizer: Any, data: str, split: str, seq_len: int, field: str | None = None) -> torch.Tensor:
    """The text as consecutive, non-overlapping windows of ``seq_len`` tokens: (n, seq_len)."""
    from llmcourse.core.data import load_text, tokenize_stream

    ids = tokenize_stream(tokenizer, load_text(data, split, field))[0]
    n = ids.numel() // seq_len
    if n < 1:
        raise UserError(f"--data {data} ({split}) has {ids.numel()} tokens, fewer than --seq-len {seq_len}",
                        "use more text or a shorter --seq-len")
    return ids[: n * seq_len].reshape(n, seq_len)


def check_windows(train_windows: torch.Tensor, cfg: DistillConfig) -> None:
    """A one-line error unless the training text fills one batch (else every step would be short of rows)."""
    if train_windows.shape[0] < cfg.batch_size:
        raise UserError(f"the training text makes {train_windows.shape[0]} window(s) of --seq-len {cfg.seq_len} tokens, "
                        f"fewer than --batch-size {cfg.batch_size}", "use more text, a shorter --seq-len or a smaller "
                        "--batch-size")


def batch_at(windows: torch.Tensor, cfg: DistillConfig, step: int) -> torch.Tensor:
    """The windows of optimizer step ``step``: epochs of a permutation seeded by (seed, epoch) only."""
    per_epoch = max(1, windows.shape[0] // cfg.batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    return windows[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless ``torch.distributed`` is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes (in place), a no-op in one process."""
    if world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor) -> dict[str, Any]:
    """Held-out perplexity of the student, and KL(teacher || student) and top-1 agreement at τ = 1, with each
    window's mean NLL (and KL): ``eval_window_nll`` / ``eval_window_kl`` (for ``paired_gap``). Under
    ``torch.distributed`` each process scores every ``world``-th window and the sums are reduced."""
    rank, size = world()
    was = student.training
    student.eval()
    n_w, T = windows.shape
    w_nll = torch.zeros(n_w, dtype=torch.float64)  # per window: summed NLL over its T - 1 targets
    w_kl = torch.zeros(n_w, dtype=torch.float64)  # summed KL over its T positions
    w_agree = torch.zeros(n_w, dtype=torch.float64)
    for i in range(rank, n_w, size):
        ids = windows[i].reshape(1, -1)
        ls = F.log_softmax(student(input_ids=ids, use_cache=False).logits[0].float(), -1)  # (T, V)
        w_nll[i] = float(F.nll_loss(ls[:-1], ids[0, 1:], reduction="sum"))
        if teacher is not None:
            lt = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[0].float(), -1)
            w_kl[i] = float((lt.exp() * (lt - ls)).sum())
            w_agree[i] = float((lt.argmax(-1) == ls.argmax(-1)).sum())
    for t in (w_nll, w_kl, w_agree):
        _all_reduce(t)
    student.train(was)
    nll = float(w_nll.sum()) / (n_w * (T - 1))
    out: dict[str, Any] = {"eval_nll": nll, "eval_perplexity": math.exp(nll),
                           "eval_window_nll": (w_nll / (T - 1)).tolist()}
    if teacher is not None:
        out.update(eval_kl=float(w_kl.sum()) / (n_w * T), eval_top1=float(w_agree.sum()) / (n_w * T),
                   eval_window_kl=(w_kl / T).tolist())
    return out


def paired_gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the per-window differences ``a - b`` of two runs on the same windows, and its standard error
    (the windows are the unit of sampling: tokens within a window are correlated)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std(unbiased=True)) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(d.mean()), se


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    student: nn.Module  # the trained student (LoRA merged)
    metrics: list[dict[str, Any]]
    steps: int
    tokens: int
    seconds: float


def _step_loss(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor,
               cfg: DistillConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over the rows ``ids`` (n, seq_len) and its parts (detached)."""
    hidden = cfg.hidden_weight > 0
    out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    V = out.logits.shape[-1]
    parts: dict[str, torch.Tensor] = {}
    ce = None
    if cfg.loss == "lm" or cfg.ce_weight > 0:
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
        parts["lm"] = ce.detach()
    if cfg.loss == "lm":
        assert ce is not None
        return ce, parts
    assert teacher is not None
    with torch.no_grad():
        tout = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    kd = kd_loss(out.logits.reshape(-1, V), tout.logits.reshape(-1, V), cfg.loss, cfg.temperature, cfg.mix)
    parts["kd"] = kd.detach()
    loss = kd if ce is None else (1 - cfg.ce_weight) * kd + cfg.ce_weight * ce
    if hidden:
        hs, ht = out.hidden_states[-1], tout.hidden_states[-1]
        h_loss = F.mse_loss(hs.float(), ht.float())
        parts["hidden"] = h_loss.detach()
        loss = loss + cfg.hidden_weight * h_loss
    return loss, parts


def distill_model(student: nn.Module, teacher: nn.Module | None, train_windows: torch.Tensor, eval_windows: torch.Tensor,
                  cfg: DistillConfig, out_dir: str | Path | None = None, resume: str | Path | None = None,
                  meta: dict[str, Any] | None = None, show_progress: bool = True) -> DistillResult:
    """Train ``student`` on ``train_windows`` (n, seq_len) with ``cfg.loss`` against ``teacher`` (None for
    ``lm``); checkpoints and metrics go to ``out_dir`` (written by rank 0 only under ``torch.distributed``).
    The student returned has any LoRA merged."""
    from llmcourse.finetune import (
        LoraSettings,
        TrainState,
        add_lora,
        cosine_lr,
        latest_checkpoint,
        load_checkpoint,
        merge,
        save_checkpoint,
        write_metrics,
    )

    rank, size = world()
    if cfg.loss != "lm" and teacher is None:
        raise UserError(f"--loss {cfg.loss} needs a teacher", "pass --teacher, or --loss lm")
    if cfg.batch_size < size:
        raise UserError(f"--batch-size {cfg.batch_size} gives a process no window ({size} processes)",
                        f"use --batch-size {size} or more, or fewer --processes")
    check_windows(train_windows, cfg)
    if teacher is not None:
        check_pair(teacher, student, cfg)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        student = add_lora(student, LoraSettings(r=16, alpha=32.0, dropout=0.0))
    else:
        for p in student.parameters():
            p.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                                         {"params": rest, "weight_decay": 0.0}) if g["params"]], lr=cfg.lr)
    total = cfg.steps
    warmup = math.ceil(cfg.warmup_ratio * total)
    state = TrainState(total_steps=total)
    if resume is not None:
        state = load_checkpoint(latest_checkpoint(resume), student, opt)
        state.total_steps = total
    out = Path(out_dir) if out_dir is not None and rank == 0 else None
    if state.step == 0:
        state.metrics.append({"step": 0, "tokens": 0, **measure(student, teacher, eval_windows)})
    student.train()
    bar = progress(total=total, initial=state.step, desc=f"distill ({cfg.loss})", unit="step") \
        if show_progress and rank == 0 else None
    while state.step < total:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(state.step, total, warmup)
        batch = batch_at(train_windows, cfg, state.step)
        ids = batch[rank::size]  # this process's rows of the global batch
        share = ids.shape[0] / batch.shape[0]  # every row is seq_len tokens: row shares are token shares
        loss, parts = _step_loss(student, teacher, ids, cfg)
        (loss * share).backward()
        logged = torch.stack([loss.detach(), *parts.values()]).double() * share
        if size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
            torch.distributed.all_reduce(logged)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state.step += 1
        state.seconds += dt
        state.tokens += batch.numel()
        row: dict[str, Any] = {"step": state.step, "tokens": state.tokens, "loss": float(logged[0]),
                               **{k: float(v) for k, v in zip(parts, logged[1:], strict=True)},
                               "lr": opt.param_groups[0]["lr"], "grad_norm": float(norm),
                               "tokens_per_s": batch.numel() / dt}
        last = state.step == total
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
            row.update(measure(student, teacher, eval_windows))
        state.metrics.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if out is not None:
            write_metrics(out / "metrics.jsonl", state.metrics)
            if (cfg.save_every and state.step % cfg.save_every == 0) or last:
                save_checkpoint(out / "checkpoints" / f"step-{state.step}", student, opt, state, cfg, meta or {})
    if bar is not None:
        bar.close()
    student.eval()
    if cfg.method == "lora":
        student = merge(student)
    return DistillResult(student, state.metrics, state.step, state.tokens, state.seconds)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "distillation") -> None:
    """Held-out perplexity and KL to the teacher against training tokens, one line per run, as a PNG."""
    from llmcourse.core.io import atomic_file
    from llmcourse.core.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, metrics in runs.items():
        train = [m for m in metrics if "loss" in m]
        axes[0].plot([m["tokens"] for m in train], [m["loss"] for m in train], lw=1, label=name)
        ev = [m for m in metrics if "eval_perplexity" in m]
        axes[1].plot([m["tokens"] for m in ev], [m["eval_perplexity"] for m in ev], "o-", label=name)
        ev = [m for m in metrics if "eval_kl" in m]
        if ev:
            axes[2].plot([m["tokens"] for m in ev], [m["eval_kl"] for m in ev], "o-", label=name)
    for ax, label in zip(axes, ("training loss (its own objective)", "held-out perplexity",
                                "held-out KL(teacher || student)"), strict=True):
        ax.set_xlabel("training tokens")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
