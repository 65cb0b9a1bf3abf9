"""Preference tuning in the fine-tuning loop: the policy's and the reference's completion log-probabilities
for a batch of pairs, and the DPO / ORPO objective the SFT training loop (``trainer.train``) minimises.

The reference model costs no second copy of the weights:

* LoRA / QLoRA: the reference is the base model, i.e. the same model with its adapters switched off
  (PEFT's ``disable_adapter()``), run under ``torch.no_grad()`` in the step, as TRL does for a PEFT model
  without ``ref_model``; the base weights are frozen and never change;
* ``precompute_ref`` (always for full fine-tuning, optional for LoRA): the reference log-probabilities of every
  pair are computed once before training, from the model as loaded, and stored with the pair; the step then
  runs one forward fewer.

Dropout is switched off in the whole model for preference tuning (TRL's ``disable_dropout=True``), so the
policy and the reference see the same deterministic function at the start: the loss starts at ``log 2``
for DPO's sigmoid loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.finetune.pref_data import PairRow, collate_pairs, pair_tokens
from llmcourse.finetune.preference import (
    DPO_LOSSES,
    dpo_loss,
    orpo_odds_ratio,
    reward_metrics,
    sequence_logps,
)

PREFERENCE_METHODS = ("dpo", "orpo")


@dataclass
class PreferenceConfig:
    """DPO / ORPO settings (validated at construction; errors name the flag). Fields with help text are
    ``finetune``'s flags (``method`` comes from ``--method``)."""

    method: str = "dpo"
    beta: float = option(0.1, "DPO's beta: strength of the KL pull to the reference (IPO: tau). Default: 0.1")
    loss_type: str = option("sigmoid", "DPO loss: sigmoid (the paper's), ipo, hinge, robust. Default: sigmoid",
                            choices=DPO_LOSSES)
    label_smoothing: float = option(0.0, "probability that a preference label is wrong, in [0, 0.5): conservative "
                                    "DPO with sigmoid, robust DPO with robust. Default: 0")
    orpo_lambda: float = option(0.1, "ORPO's lambda (weight of the odds-ratio term; TRL's ORPOConfig.beta). "
                                "Default: 0.1")
    precompute_ref: bool = option(False, "DPO: compute the reference log-probabilities once before training "
                                  "(always with --adapter full) instead of with the adapters off in each step")

    def __post_init__(self) -> None:
        if self.method not in PREFERENCE_METHODS:
            raise UserError(f"unknown preference method {self.method!r}", "use --method dpo or --method orpo")
        if not self.beta > 0:
            raise UserError(f"--beta must be > 0, got {self.beta}", "pass --beta 0.1")
        if self.loss_type not in DPO_LOSSES:
            raise UserError(f"unknown --loss-type {self.loss_type!r}", f"use one of {', '.join(DPO_LOSSES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}",
                            "pass --label-smoothing 0.1 (or 0)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise UserError(f"--label-smoothing applies to the sigmoid and robust losses, not {self.loss_type}",
                            "drop --label-smoothing or use --loss-type sigmoid")
        if not self.orpo_lambda > 0:
            raise UserError(f"--orpo-lambda must be > 0, got {self.orpo_lambda}", "pass --orpo-lambda 0.1")


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def completion_token_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log pi(y_t | x, y_<t)`` of every completion token of the batch (N,), in the batch's ``target`` order.
    The output head runs only where a completion token is predicted."""
    body, head = _body_and_head(model)
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state[0]  # (T, H)
    logits = head(hidden[batch["source"]]).float()  # (N, V)
    return -F.cross_entropy(logits, batch["target"], reduction="none")


def adapters_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """The reference model: the PEFT model with its adapters switched off (a no-op context otherwise)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) summed completion log-probabilities under the reference (adapters off, no gradient)."""
    n = batch["lengths"].numel()
    with adapters_off(model):
        return sequence_logps(completion_token_logps(model, batch), batch["sequence"], n)


@torch.no_grad()
def precompute_reference(model: nn.Module, rows: list[PairRow], batch_size: int = 8) -> None:
    """Store the reference log-probabilities in each row (adapters off; for full tuning: the model as is)."""
    was = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ref = reference_logps(model, collate_pairs(chunk)).tolist()
        for k, r in enumerate(chunk):
            r.ref_chosen, r.ref_rejected = ref[k], ref[len(chunk) + k]
    model.train(was)


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every dropout module (TRL's ``disable_dropout_in_model``)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class PreferenceObjective:
    """DPO or ORPO for ``trainer.train`` (see ``trainer.Objective``): DPO's loss is the mean over the step's
    pairs; ORPO's NLL term the mean over its chosen completion tokens, its odds-ratio term the mean over pairs."""

    metric_unit = "pairs"

    def __init__(self, cfg: PreferenceConfig) -> None:
        self.cfg = cfg

    def batch(self, rows: list[PairRow], pad_id: int, train_cfg: Any) -> dict[str, torch.Tensor]:
        return collate_pairs(rows)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        B = batch["lengths"].numel() // 2
        if self.cfg.method == "orpo":
            return {"pairs": B, "chosen_tokens": int(batch["lengths"][:B].sum())}
        return {"pairs": B}

    def tokens(self, rows: list[PairRow]) -> int:
        return pair_tokens(rows)

    def sums(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        lengths = batch["lengths"]
        B = lengths.numel() // 2
        token_logps = completion_token_logps(model, batch)
        logps = sequence_logps(token_logps, batch["sequence"], 2 * B)
        chosen, rejected = logps[:B], logps[B:]
        if self.cfg.method == "orpo":
            return self._orpo(token_logps, batch, chosen, rejected, lengths[:B], lengths[B:])
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(model, batch)
        losses, r_c, r_r = dpo_loss(chosen, rejected, ref[:B], ref[B:], self.cfg.beta, self.cfg.loss_type,
                                    self.cfg.label_smoothing, lengths[:B], lengths[B:])
        return {"pairs": losses.sum()}, reward_metrics(r_c, r_r, chosen, rejected)

    def _orpo(self, token_logps: torch.Tensor, batch: dict[str, torch.Tensor], chosen: torch.Tensor,
              rejected: torch.Tensor, len_c: torch.Tensor, len_r: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        lam = self.cfg.orpo_lambda
        B = len_c.numel()
        nll_sum = -token_logps[batch["sequence"] < B].sum()  # NLL of the chosen completion tokens
        mean_c, mean_r = chosen / len_c, rejected / len_r  # log P(y|x), length-averaged
        log_sigma_or, log_or = orpo_odds_ratio(mean_c, mean_r)
        r_c, r_r = lam * mean_c.detach(), lam * mean_r.detach()
        metrics = reward_metrics(r_c, r_r, chosen, rejected)
        metrics.update({"nll_loss": float(nll_sum.detach()) * B / max(1, int(len_c.sum())),
                        "log_odds_ratio": float(log_sigma_or.detach().sum()),
                        "log_odds_chosen": float(log_or.detach().sum())})
        return {"chosen_tokens": nll_sum, "pairs": -lam * log_sigma_or.sum()}, metrics


def plot_rewards(metrics: list[dict[str, Any]], path: Any, title: str = "implicit rewards") -> None:
    """Per step: the mean chosen and rejected rewards and their margin (TRL's ``rewards/*``), and the fraction of
    pairs ranked right, as a PNG."""
    from llmcourse.core.io import atomic_file
    from llmcourse.core.report import pyplot

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [m["step"] for m in metrics]
    for k, style in (("rewards/chosen", "-"), ("rewards/rejected", "-"), ("rewards/margins", "--")):
        ax.plot(steps, [m.get(k, float("nan")) for m in metrics], style, label=k, lw=1.2)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot(steps, [m.get("rewards/accuracies", float("nan")) for m in metrics], lw=1.2)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("rewards/accuracies")
    ax2.set_title("pairs with chosen reward > rejected")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
