"""Preference losses from the papers: DPO (Rafailov et al. 2023), its IPO, hinge and label-smoothed variants,
and ORPO (Hong et al. 2024). Pure functions of per-sequence log-probabilities, read top to bottom.

Notation (the papers'): a prompt ``x``, a preferred completion ``y_w`` (chosen) and a dispreferred ``y_l``
(rejected); ``pi_theta`` the policy being trained, ``pi_ref`` the frozen reference; the log-probability of a
completion is the sum over its tokens, ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` (completion tokens
only, never the prompt's).

**DPO** (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model"). The RLHF objective ``max_pi E[r(x, y)] - beta KL(pi || pi_ref)`` has the closed-form optimum
``pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)``, so a policy defines an implicit reward

    r_theta(x, y) = beta log( pi_theta(y|x) / pi_ref(y|x) )           (+ beta log Z(x), which cancels in pairs)

and the Bradley-Terry likelihood of the preference ``y_w > y_l`` is ``sigma(r(x, y_w) - r(x, y_l))``:

    h = log pi_theta(y_w|x)/pi_ref(y_w|x) - log pi_theta(y_l|x)/pi_ref(y_l|x)
    L_DPO   = - log sigma(beta h)                                      loss_type "sigmoid"   (paper eq. 7)
    L_cDPO  = - (1 - eps) log sigma(beta h) - eps log sigma(-beta h)   "sigmoid" with label smoothing eps
                                                                         (conservative DPO: labels flipped with
                                                                         probability eps; Mitchell 2023)
    L_rDPO  = ((1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))) / (1 - 2 eps)
                                                                       loss_type "robust" (Chowdhury et al. 2024,
                                                                         unbiased under label noise eps)
    L_hinge = max(0, 1 - beta h)                                       loss_type "hinge" (SLiC, Zhao et al. 2023)

**IPO** (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
eq. 17): a squared loss that regresses the log-ratio gap to ``1 / (2 tau)`` instead of pushing it to
infinity (``tau`` is passed as ``beta``). As in TRL, each log-ratio is averaged over its completion tokens
(|y| the completion length) so that ``tau`` does not depend on the answer's length:

    L_IPO = ( (log pi_theta(y_w|x)/pi_ref(y_w|x)) / |y_w| - (log pi_theta(y_l|x)/pi_ref(y_l|x)) / |y_l|
              - 1 / (2 tau) )^2

Logged as TRL logs them: ``rewards/chosen = beta (log pi_theta(y_w) - log pi_ref(y_w))``, ``rewards/rejected``
likewise, ``rewards/margins`` their difference, ``rewards/accuracies`` the fraction of pairs where the chosen
reward is larger, ``logps/chosen`` and ``logps/rejected`` the policy's summed log-probabilities.

**ORPO** (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"). No
reference model: the SFT loss on the chosen completion plus an odds-ratio term. With the length-averaged
log-probability ``log P(y|x) = 1/|y| sum_t log pi_theta(y_t | x, y_<t)`` (paper eq. 1) and the odds
``odds(y|x) = P(y|x) / (1 - P(y|x))`` (eq. 4):

    log OR = log odds(y_w|x) - log odds(y_l|x)
           = (log P_w - log P_l) - (log(1 - P_w) - log(1 - P_l))         (log(1 - P) = log1mexp(log P))
    L_OR   = - log sigma(log OR)                                         (eq. 7)
    L_ORPO = L_SFT + lambda L_OR                                         (eq. 6)

``L_SFT`` is the mean negative log-likelihood of the chosen completion tokens. Logged as TRL's ORPO trainer
logs them: ``rewards/chosen = lambda log P_w``, ``rewards/rejected = lambda log P_l`` (length-averaged),
``log_odds_ratio`` (mean ``log sigma(log OR)``), ``log_odds_chosen`` (mean ``log OR``), ``nll_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


# ---------------------------------------------------------------- log-probabilities


def sequence_logps(token_logps: torch.Tensor, sequence: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """``log pi(y | x)`` of each sequence: the sum of its completion tokens' log-probabilities.

    ``token_logps`` (N,) are ``log pi(y_t | x, y_<t)`` of the N completion tokens of a batch, ``sequence`` (N,)
    the index of the sequence each belongs to; returns (n_sequences,)."""
    out = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, sequence, token_logps)


# ---------------------------------------------------------------- DPO (Rafailov et al. 2023) and variants


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards ``beta log pi_theta/pi_ref`` of chosen and rejected.

    All inputs are (B,) summed log-probabilities of the completions; ``chosen_lengths`` / ``rejected_lengths``
    (completion token counts) are needed by ``ipo`` only. Returns ``(losses, chosen_rewards, rejected_rewards)``,
    each (B,); the rewards are detached (metrics)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # log pi_theta(y_w|x) / pi_ref(y_w|x)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # log pi_theta(y_l|x) / pi_ref(y_l|x)
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the completion lengths")
        tau = beta
        gap = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (gap - 1 / (2 * tau)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen_logps: torch.Tensor,
                   policy_rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's logged metrics, as sums over the pairs (the training loop divides by the number of pairs)."""
    return {
        "rewards/chosen": float(chosen_rewards.sum()),
        "rewards/rejected": float(rejected_rewards.sum()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().sum()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
        "logps/chosen": float(policy_chosen_logps.detach().sum()),
        "logps/rejected": float(policy_rejected_logps.detach().sum()),
    }


# ---------------------------------------------------------------- ORPO (Hong et al. 2024)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sigma(log OR), log OR)`` per pair from the length-averaged log-probabilities ``log P(y|x)``."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps)
                                                            - log1mexp(rejected_mean_logps))
    return F.logsigmoid(log_odds), log_odds


def orpo_loss(chosen_nll: torch.Tensor, chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor,
              lam: float = 0.1) -> torch.Tensor:
    """``L_SFT + lambda L_OR`` for one batch: ``chosen_nll`` the mean NLL of the chosen completion tokens,
    the log-probabilities (B,) length-averaged."""
    log_sigma_or, _ = orpo_odds_ratio(chosen_mean_logps, rejected_mean_logps)
    return chosen_nll - lam * log_sigma_or.mean()
