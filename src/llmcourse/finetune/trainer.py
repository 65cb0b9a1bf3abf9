"""The SFT training loop: AdamW, cosine schedule with warmup, gradient accumulation and clipping, eval loss,
safetensors checkpoints that resume bit for bit, metrics JSONL and a loss curve.

Learning rate at optimizer step ``t`` of ``T`` (``W = ceil(warmup_ratio T)`` warmup steps, as transformers'
``get_cosine_schedule_with_warmup``):

    lr_t = lr t / W                                     t < W
    lr_t = lr 1/2 (1 + cos(pi (t - W) / (T - W)))       otherwise

The loss of one optimizer step is the mean over every response token of its ``grad_accum`` micro-batches
(summed, then divided by the step's token count), so accumulation and packing do not re-weight examples.
Logits are computed only where a label is: the output head (49k x 576 on the default model) runs on the
response tokens, not on every position.

Batch order is a function of (seed, epoch) only, and the checkpoint stores the trainable weights, AdamW's
moments, the step and the RNG state (dropout), so ``--resume`` continues the same curve bit for bit.

With a TensorBoard log folder, rank 0 also writes an event file (``torch.utils.tensorboard``): per step
``train/loss``, ``train/learning_rate``, ``train/tokens_per_s``, ``train/grad_norm``, and ``eval/loss``
where measured; a resumed run continues the same curve (``purge_step`` drops events past the checkpoint).

Padding-free batches (the default without ``--packing``): the micro-batch's examples are laid end to
end in one row, each with its own position ids and a block-diagonal causal mask (``collate`` of one packed
row), so no pad token is computed and the loss is the one of the padded batch. Gradient checkpointing
(``gradient_checkpointing``) keeps only each decoder block's input and recomputes the block in the backward
(transformers' non-reentrant ``torch.utils.checkpoint``): less activation memory for one more forward.

Multi-process (``torchrun`` / ``accelerate launch``, gloo on CPUs): each process takes every
``world``-th row of each batch, the token count is summed over processes and gradients are all-reduced
(summed), so the update equals the single-process one with the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.core.cli_common import option, positive_int
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, atomic_file
from llmcourse.core.progress import progress, stage
from llmcourse.finetune.sft_data import IGNORE, Row, collate, count_tokens, join_rows

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # notebook 4 (QLoRA on Llama 2): batch 4, lr 2e-4, cosine, warmup 0.03, weight decay 0.001, max grad norm 0.3
    "course": dict(batch_size=4, grad_accum=1, lr=2e-4, warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3,
                   epochs=1.0),
}


@dataclass
class TrainConfig:
    """Optimization settings (validated at construction). Fields with help text are ``finetune``'s flags."""

    batch_size: int = option(4, "rows per micro-batch. Default: 4", type=positive_int)
    grad_accum: int = option(1, "micro-batches per optimizer step. Default: 1", type=positive_int)
    lr: float = option(2e-4, "peak learning rate. Default: 2e-4")
    warmup_ratio: float = option(0.03, "fraction of the steps with a linear warmup, then cosine decay to 0. "
                                 "Default: 0.03")
    weight_decay: float = option(0.001, "AdamW weight decay. Default: 0.001")
    max_grad_norm: float = option(0.3, "gradient clipping, 0 = off. Default: 0.3")
    epochs: float = option(1.0, "passes over the data. Default: 1")
    max_steps: int | None = option(None, "optimizer steps; overrides --epochs. Default: from --epochs",
                                   type=positive_int)
    seq_len: int = option(256, "tokens per example / packed row. Default: 256", type=positive_int)
    packing: bool = option(False, "pack examples into rows of --seq-len (own position ids, block-diagonal mask)")
    padding_free: bool = True  # one row per micro-batch, no pad tokens (same function as padding)
    gradient_checkpointing: bool = option(False, "recompute each decoder block in the backward: less memory, "
                                          "about one more forward. Default: off")
    full_loss: bool = option(False, "loss on every token, prompt included")
    eval_every: int = option(0, "eval loss every N steps; 0 = at the end. Default: 0")
    save_every: int = option(0, "checkpoint every N steps; 0 = at the end. Default: 0")
    log_every: int = 1
    seed: int = option(0, "data order, LoRA init and dropout. Default: 0")
    eval_batches: int | None = None  # cap on eval batches (None: all)

    def __post_init__(self) -> None:
        for k in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(self, k)}", f"pass --{k.replace('_', '-')} 1 or more")
        if not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}", "pass --lr 2e-4")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}", "pass --warmup-ratio 0.03")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("weight decay and max grad norm must be >= 0", "pass --weight-decay 0.001 --max-grad-norm 0.3")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}", "pass --max-steps 10")
        if not self.epochs > 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}", "pass --epochs 1")


@dataclass
class TrainState:
    """What a run produced: its metrics and where it stopped."""

    step: int = 0
    total_steps: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """The schedule's multiplier of ``lr`` at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress_))


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model body (hidden states out) and the output head of a causal LM (also inside a PeftModel)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix)
    return body, inner.get_output_embeddings()


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, number of predicted tokens) of one batch; the head runs on labelled positions."""
    body, head = _decoder_and_head(model)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = body(**kw, use_cache=False).last_hidden_state  # (B, T, H)
    target = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at t
    keep = target != IGNORE
    logits = head(hidden[:, :-1][keep])  # (N, V)
    return F.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def eval_loss(model: nn.Module, rows: list[Any], cfg: TrainConfig, pad_id: int,
              objective: Objective | None = None) -> float | None:
    """The objective's loss over ``rows`` (eval mode: no dropout); SFT: the mean token loss."""
    if not rows:
        return None
    obj = objective or SFT
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    batches = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    for b in batches[: cfg.eval_batches]:
        t = obj.batch(b, pad_id, cfg)
        for k, v in obj.counts(t).items():
            counts[k] = counts.get(k, 0) + v
        for k, v in obj.sums(model, t)[0].items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was)
    return sum(v / max(1, counts[k]) for k, v in sums.items())


class Objective(Protocol):
    """What one training step minimises, so that SFT and preference tuning share one loop.

    The step's loss is ``sum_k S_k / N_k``: ``S_k`` the sum of the loss terms counted in unit ``k`` over the
    step's micro-batches (and processes), ``N_k`` the step's count of that unit (SFT: predicted tokens; DPO:
    pairs; ORPO: chosen tokens for its NLL term and pairs for its odds-ratio term). Metrics are sums too,
    divided by ``N[metric_unit]``.
    """

    metric_unit: str

    def batch(self, rows: list[Any], pad_id: int, cfg: TrainConfig) -> dict[str, torch.Tensor]: ...

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]: ...

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...

    def tokens(self, rows: list[Any]) -> int: ...


class SFTObjective:
    """Supervised fine-tuning: the mean negative log-likelihood of the response tokens."""

    metric_unit = "tokens"

    def batch(self, rows: list[Row], pad_id: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        return batch_tensors(rows, pad_id, cfg)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"tokens": int((batch["labels"][:, 1:] != IGNORE).sum())}

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {"tokens": loss_sum(model, batch)[0]}, {}

    def tokens(self, rows: list[Row]) -> int:
        return count_tokens(rows)


SFT = SFTObjective()


def batch_tensors(rows: list[Row], pad_id: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The model inputs of ``rows``: packed rows, one padding-free row, or padded rows."""
    if cfg.packing:
        return collate(rows, pad_id, True)
    if cfg.padding_free:
        return collate([join_rows(rows)], pad_id, True)
    return collate(rows, pad_id, False)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn transformers' activation (gradient) checkpointing (non-reentrant, per decoder block) on or off.

    transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*`` (the old names
    warn: FutureWarning, removed in v6); the new names are used where the model has them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "activation_checkpointing_enable"):
        if on:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif inner.is_activation_checkpointing:
            inner.activation_checkpointing_disable()
    elif on:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(inner, "is_gradient_checkpointing", False):
        inner.gradient_checkpointing_disable()


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def batch_order(n_rows: int, cfg: TrainConfig, epoch: int) -> list[int]:
    """The row order of ``epoch``: a permutation seeded by (seed, epoch) only."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()


def micro_batch(rows: list[Row], cfg: TrainConfig, k: int) -> list[Row]:
    """The ``k``-th micro-batch of the whole run (epochs follow one another)."""
    per_epoch = max(1, len(rows) // cfg.batch_size)
    epoch, i = divmod(k, per_epoch)
    order = batch_order(len(rows), cfg, epoch)
    return [rows[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]


def total_steps(n_rows: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = max(1, n_rows // cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


# ---------------------------------------------------------------- checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match to resume: the trainable tensors' names and shapes, and the model config."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "n_embd", "n_layer")
    return {"config": {k: cfg[k] for k in keys if k in cfg},
            "trainable": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}}


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: TrainState,
                    cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """``path/`` (atomic): trainable.safetensors, optimizer.safetensors (AdamW moments), state.json."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, opt_meta = {}, []
    for gi, g in enumerate(opt.param_groups):
        for p in g["params"]:
            n = names[id(p)]
            st = opt.state.get(p, {})
            for k, v in st.items():
                opt_tensors[f"{n}::{k}"] = v.detach().clone().contiguous().reshape(v.shape)
            opt_meta.append([gi, n])
    rng = torch.get_rng_state()
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file({**opt_tensors, "__rng__": rng}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "total_steps": state.total_steps, "tokens": state.tokens, "seconds": state.seconds,
            "metrics": state.metrics, "config": asdict(cfg), "fingerprint": fingerprint(model), **extra,
        }, indent=1))


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest ``checkpoints/step-N``."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    found = sorted((p / "checkpoints").glob("step-*"), key=lambda q: int(q.name.split("-")[1])) if p.is_dir() else []
    if not found:
        raise UserError(f"--resume {path} holds no checkpoint", "pass a finetune --out folder or its checkpoints/step-N")
    return found[-1]


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer and RNG from ``path``; a checkpoint of another model is refused."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint(model))):
        raise UserError(f"checkpoint {path} was made for another model or method",
                        "resume with the same --model, --method and LoRA settings, or start a new --out")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    saved = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(saved.pop("__rng__"))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            st = {k.split("::", 1)[1]: v for k, v in saved.items() if k.split("::", 1)[0] == n}
            if st:
                opt.state[p] = st
    return TrainState(step=meta["step"], total_steps=meta["total_steps"], metrics=meta["metrics"],
                      seconds=meta["seconds"], tokens=meta["tokens"])


# ---------------------------------------------------------------- the loop


def train(model: nn.Module, train_rows: list[Any], eval_rows: list[Any], cfg: TrainConfig, pad_id: int,
          out_dir: str | Path | None = None, resume: str | Path | None = None,
          extra_meta: dict[str, Any] | None = None, show_progress: bool = True,
          tensorboard: str | Path | None = None, objective: Objective | None = None) -> TrainState:
    """Train the parameters of ``model`` that require grad on ``objective`` (default: SFT); checkpoints go to
    ``out_dir/checkpoints``, a TensorBoard event log to ``tensorboard`` (a folder) when given."""
    if not train_rows:
        raise UserError("the training set is empty after tokenization", "check --data and --seq-len")
    obj = objective or SFT
    rank, world = _world()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    total = total_steps(len(train_rows), cfg)
    warmup = math.ceil(cfg.warmup_ratio * total)
    state = TrainState(total_steps=total)
    if resume is not None:
        state = load_checkpoint(latest_checkpoint(resume), model, opt)
        state.total_steps = total
    out = Path(out_dir) if out_dir is not None else None
    set_checkpointing(model, cfg.gradient_checkpointing)
    model.train()
    bar = progress(total=total, initial=state.step, desc="finetune", unit="step") if show_progress else None
    tb = tensorboard_writer(tensorboard, state.step) if tensorboard is not None and rank == 0 else None
    while state.step < total:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(state.step, total, warmup)
        micro = [micro_batch(train_rows, cfg, state.step * cfg.grad_accum + a) for a in range(cfg.grad_accum)]
        batches = [obj.batch(m[rank::world], pad_id, cfg) for m in micro if m[rank::world]]
        counts: dict[str, int] = {}
        for b in batches:
            for k, v in obj.counts(b).items():
                counts[k] = counts.get(k, 0) + v
        n_tok = sum(obj.tokens(m) for m in micro)
        if world > 1:
            keys = sorted(counts)
            c = torch.tensor([counts[k] for k in keys], dtype=torch.long)
            torch.distributed.all_reduce(c)
            counts = dict(zip(keys, c.tolist(), strict=True))
        step_loss = 0.0
        msums: dict[str, float] = {}
        for b in batches:
            sums, metrics = obj.sums(model, b)
            loss = sum(s / max(1, counts[k]) for k, s in sums.items())
            loss.backward()
            step_loss += float(loss.detach())
            for k, v in metrics.items():
                msums[k] = msums.get(k, 0.0) + v
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
            keys = sorted(msums)
            lt = torch.tensor([step_loss] + [msums[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(lt)
            step_loss, msums = float(lt[0]), dict(zip(keys, lt[1:].tolist(), strict=True))
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state.step += 1
        state.seconds += dt
        state.tokens += n_tok
        row: dict[str, Any] = {"step": state.step, "loss": step_loss, "lr": opt.param_groups[0]["lr"],
                               "grad_norm": float(norm), "tokens": n_tok, "tokens_per_s": n_tok / dt}
        row.update({k: v / max(1, counts.get(obj.metric_unit, 0)) for k, v in msums.items()})
        last = state.step == total
        if bar is not None:  # the step is done: the bar says so before evaluating or saving
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{n_tok / dt:.0f}")
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
            with stage(bar, f"evaluating on {len(eval_rows)} held-out rows"):
                row["eval_loss"] = eval_loss(model, eval_rows, cfg, pad_id, obj)
        state.metrics.append(row)
        if tb is not None:
            log_tensorboard(tb, row)
        if out is not None and rank == 0:
            write_metrics(out / "metrics.jsonl", state.metrics)
            if (cfg.save_every and state.step % cfg.save_every == 0) or last:
                with stage(bar, "saving a checkpoint"):
                    save_checkpoint(out / "checkpoints" / f"step-{state.step}", model, opt, state, cfg,
                                    extra_meta or {})
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    set_checkpointing(model, False)
    model.eval()
    return state


def check_tensorboard() -> Any:
    """torch's ``SummaryWriter`` class; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        raise UserError("--tensorboard needs the tensorboard package",
                        "pip install 'llmcourse[finetune]' (or tensorboard==2.21.0)") from None
    return SummaryWriter


def tensorboard_writer(log_dir: str | Path, start_step: int = 0) -> Any:
    """A ``SummaryWriter`` on ``log_dir`` (events after ``start_step`` from an earlier run are dropped)."""
    return check_tensorboard()(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)


def log_tensorboard(writer: Any, row: dict[str, Any]) -> None:
    """One step's scalars (the metrics.jsonl row) as TensorBoard events."""
    step = row["step"]
    writer.add_scalar("train/loss", row["loss"], step)
    writer.add_scalar("train/learning_rate", row["lr"], step)
    writer.add_scalar("train/tokens_per_s", row["tokens_per_s"], step)
    writer.add_scalar("train/grad_norm", row["grad_norm"], step)
    if row.get("eval_loss") is not None:
        writer.add_scalar("eval/loss", row["eval_loss"], step)
    for k, v in row.items():
        if "/" in k:  # the preference metrics, e.g. rewards/margins (TRL's names)
            writer.add_scalar(f"train/{k}", v, step)
    writer.flush()


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    with atomic_file(path, "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str = "fine-tuning loss") -> None:
    """Training loss per step and eval loss where measured, as a PNG."""
    from llmcourse.core.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss", lw=1.2)
    ev = [m for m in metrics if m.get("eval_loss") is not None]
    if ev:
        ax.plot([m["step"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="eval loss (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
