"""Logits processors and warpers: one small pure function each, and the chains that order them.

Every function takes ``scores`` of shape ``(B, V)`` (float logits or log-probabilities) and
returns a *new* tensor; the input is never modified in place. Filtered-out tokens get
``-inf`` so that ``softmax`` gives them probability 0. The masks follow transformers 5.24's
``generation/logits_process.py`` exactly (the tests compare them on random logits), and the
llama.cpp-only penalties follow ``llama-sampling.cpp``.

Formulas (``z`` logits, ``p = softmax(z)``):

* temperature (Ackley et al. 1985): ``z / T``.
* top-k (Fan et al. 2018, "Hierarchical Neural Story Generation"): keep ``z_i >= z_(k)``, the
  k-th largest logit (ties at the threshold are kept).
* top-p / nucleus (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"): sort
  ascending, drop the tokens whose cumulative probability is ``<= 1 - P``; the smallest set of
  most likely tokens whose mass reaches ``P`` remains.
* min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): drop ``p_i < m * max_j p_j``.
* typical (Meister et al. 2023, "Locally Typical Sampling"): with entropy ``H = -sum p log p``,
  rank tokens by ``|-log p_i - H|`` and keep the most typical ones until their mass reaches ``tau``.
* epsilon (Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing"): drop ``p_i < eps``.
* eta (same paper): drop ``p_i < min(eta, sqrt(eta) * exp(-H))``.
* repetition penalty (Keskar et al. 2019, CTRL): for every token already in the context,
  ``z_i * r`` if ``z_i < 0`` else ``z_i / r``.
* frequency / presence penalties (OpenAI API, llama.cpp): ``z_i - c_i * f - [c_i > 0] * pr`` with
  ``c_i`` the count of token i in the penalty window.
* no-repeat-ngram (Paulus et al. 2018): ban every token that would complete an n-gram that
  already occurs in the context.

The two chain presets (``CHAINS``): ``hf`` is transformers' order (penalties, n-gram ban,
then temperature, top-k, top-p, min-p, typical, epsilon, eta); ``llama.cpp`` is llama.cpp's
default sampler chain (penalties, top-k, typical, top-p, min-p, then temperature last, so
the truncations see the untempered distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmcourse.core.cli_common import option

NEG_INF = -float("inf")


# --- penalties (processors: also applied by greedy and beam search) -------------------------------

def repetition_penalty(scores: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token in ``ids`` (B, T): divide positive scores, multiply negative ones."""
    if penalty == 1.0 or ids.shape[-1] == 0:
        return scores
    seen = torch.gather(scores, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, ids, seen)


def frequency_presence_penalty(scores: torch.Tensor, ids: torch.Tensor, frequency: float,
                               presence: float) -> torch.Tensor:
    """Subtract ``count * frequency + [count > 0] * presence`` from each token's score."""
    if (frequency == 0.0 and presence == 0.0) or ids.shape[-1] == 0:
        return scores
    counts = torch.zeros_like(scores).scatter_add(1, ids, torch.ones_like(ids, dtype=scores.dtype))
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


def banned_ngram_mask(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: tokens that would repeat an n-gram already present in each row of ``ids``."""
    mask = torch.zeros((ids.shape[0], vocab_size), dtype=torch.bool)
    t = ids.shape[-1]
    if n <= 0 or t < n:
        return mask
    for b, row in enumerate(ids.tolist()):
        prefix = tuple(row[t + 1 - n:]) if n > 1 else ()
        for start in range(t - n + 1):
            if tuple(row[start:start + n - 1]) == prefix:
                mask[b, row[start + n - 1]] = True
    return mask


def no_repeat_ngram(scores: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already in the context."""
    if n <= 0 or ids.shape[-1] < n:
        return scores
    return scores.masked_fill(banned_ngram_mask(ids, n, scores.shape[-1]), NEG_INF)


# --- warpers (sampling only) -----------------------------------------------------------------------

def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    """Divide the logits by ``t`` (t < 1 sharpens, t > 1 flattens)."""
    return scores if t == 1.0 else scores / t


def top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the ``k`` highest scores (and any tied with the k-th)."""
    if k <= 0:
        return scores
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the most likely tokens whose cumulative probability reaches ``p``."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -min_keep:] = False  # a fresh tensor, so this write touches no input
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def min_p(scores: torch.Tensor, m: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the tokens whose probability is at least ``m`` times the top token's."""
    if m <= 0.0:
        return scores
    probs = torch.softmax(scores, dim=-1)
    drop = probs < m * probs.amax(dim=-1, keepdim=True)
    best = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    drop = drop.scatter(-1, best, False)
    return scores.masked_fill(drop, NEG_INF)


def typical_p(scores: torch.Tensor, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprisal is closest to the entropy, up to ``mass``."""
    if mass >= 1.0:
        return scores
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance = torch.abs(-logp - entropy)
    sorted_distance, order = torch.sort(distance, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=sorted_distance.shape[-1] - 1)
    drop_sorted = sorted_distance > sorted_distance.gather(1, last.view(-1, 1))
    drop_sorted[..., :min_keep] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def _keep_top(drop: torch.Tensor, scores: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Never drop the ``min_keep`` highest scores."""
    kth = torch.topk(scores, min(min_keep, scores.shape[-1])).values[..., -1:]
    return drop & (scores < kth)


def epsilon_cutoff(scores: torch.Tensor, eps: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below ``eps``."""
    if not 0.0 < eps < 1.0:
        return scores
    drop = _keep_top(scores.softmax(dim=-1) < eps, scores, min_keep)
    return scores.masked_fill(drop, NEG_INF)


def eta_cutoff(scores: torch.Tensor, eta: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens below the entropy-dependent threshold ``min(eta, sqrt(eta) * exp(-H))``."""
    if not 0.0 < eta < 1.0:
        return scores
    probs = scores.softmax(dim=-1)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    eta_t = torch.tensor(eta)
    threshold = torch.min(eta_t, torch.sqrt(eta_t) * torch.exp(-entropy))[..., None]
    drop = _keep_top(probs < threshold, scores, min_keep)
    return scores.masked_fill(drop, NEG_INF)


# --- chains --------------------------------------------------------------------------------------

@dataclass
class SamplerSettings:
    """The numbers the chain needs; :class:`llmcourse.decoding.engine.GenerationConfig` extends it and validates them.

    Each field is declared once with its default and help text; the CLI flags are generated from them
    (:func:`llmcourse.core.cli_common.add_config_args`)."""

    temperature: float = option(1.0, "divide logits by T before sampling (< 1 sharper, > 1 flatter). "
                                "Default: %(default)s")
    top_k: int = option(0, "keep the K most likely tokens (0: off). Default: %(default)s")
    top_p: float = option(1.0, "nucleus: keep the most likely tokens up to cumulative probability P. "
                          "Default: %(default)s")
    min_p: float = option(0.0, "keep tokens with probability >= P x the top token's (0: off). Default: %(default)s")
    typical_p: float = option(1.0, "locally typical sampling mass (1: off). Default: %(default)s")
    epsilon: float = option(0.0, "epsilon sampling: drop tokens with probability < E (0: off). Default: %(default)s")
    eta: float = option(0.0, "eta sampling: entropy-dependent cut-off (0: off). Default: %(default)s")
    repetition_penalty: float = option(1.0, "CTRL penalty on tokens already in the context (1: off). "
                                       "Default: %(default)s")
    frequency_penalty: float = option(0.0, "subtract X x (count of the token in the window) from its logit. "
                                      "Default: %(default)s")
    presence_penalty: float = option(0.0, "subtract X from the logit of every token in the window. "
                                     "Default: %(default)s")
    penalty_last_n: int = option(0, "penalty window in tokens (0: the whole context, as transformers; llama.cpp "
                                 "uses 64). Default: %(default)s")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size (0: off). Default: %(default)s")
    min_keep: int = 1


Step = Callable[[torch.Tensor, torch.Tensor, SamplerSettings], torch.Tensor]


def _penalty_window(ids: torch.Tensor, s: SamplerSettings) -> torch.Tensor:
    return ids[:, -s.penalty_last_n:] if s.penalty_last_n > 0 else ids


STEPS: dict[str, Step] = {
    "repetition": lambda z, ids, s: repetition_penalty(z, _penalty_window(ids, s), s.repetition_penalty),
    "frequency": lambda z, ids, s: frequency_presence_penalty(z, _penalty_window(ids, s), s.frequency_penalty,
                                                              s.presence_penalty),
    "no_repeat_ngram": lambda z, ids, s: no_repeat_ngram(z, ids, s.no_repeat_ngram_size),
    "temperature": lambda z, ids, s: temperature(z, s.temperature),
    "top_k": lambda z, ids, s: top_k(z, s.top_k, s.min_keep),
    "top_p": lambda z, ids, s: top_p(z, s.top_p, s.min_keep),
    "min_p": lambda z, ids, s: min_p(z, s.min_p, s.min_keep),
    "typical_p": lambda z, ids, s: typical_p(z, s.typical_p, s.min_keep),
    "epsilon": lambda z, ids, s: epsilon_cutoff(z, s.epsilon, s.min_keep),
    "eta": lambda z, ids, s: eta_cutoff(z, s.eta, s.min_keep),
}

PENALTIES = ("repetition", "frequency", "no_repeat_ngram")
CHAINS: dict[str, tuple[str, ...]] = {
    "hf": (*PENALTIES, "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta"),
    "llama.cpp": (*PENALTIES, "top_k", "typical_p", "top_p", "min_p", "epsilon", "eta", "temperature"),
}


def apply_chain(scores: torch.Tensor, ids: torch.Tensor, s: SamplerSettings,
                order: Sequence[str], sampling: bool = True) -> torch.Tensor:
    """Run the steps of ``order`` on ``scores`` (B, V); without ``sampling`` only the penalties run."""
    for name in order:
        if sampling or name in PENALTIES:
            scores = STEPS[name](scores, ids, s)
    return scores


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``probs`` (B, V) -> (B,)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def entropy_nats(scores: torch.Tensor) -> float:
    """Entropy of ``softmax(scores)`` of one row, in nats (for plots and docs)."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    return float(-(logp.exp() * logp).nansum())


__all__ = [
    "CHAINS", "NEG_INF", "PENALTIES", "STEPS", "SamplerSettings", "apply_chain", "banned_ngram_mask",
    "entropy_nats", "epsilon_cutoff", "eta_cutoff", "frequency_presence_penalty", "min_p", "no_repeat_ngram",
    "repetition_penalty", "sample", "temperature", "top_k", "top_p", "typical_p",
]
