"""Speculative decoding: several tokens per forward of the big model when a cheap guess is right.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (their
names: target model ``M_p``, draft model ``M_q``, ``γ`` drafted tokens), and Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling". Prompt lookup (Saxena 2023,
transformers' ``prompt_lookup_num_tokens``, llama.cpp's ``lookup``) drafts without a second model.

Decoding one token costs one pass over the target's weights whether it scores 1 position or a few
(a step is bound by reading the weights). So: guess ``γ`` tokens cheaply, score all of them in ONE
forward of ``M_p``, keep the longest prefix the target agrees with, and get one token of the
target's own for free. One round, with ``x`` the text so far and ``y`` its last token::

    draft     x̃_1 .. x̃_γ                     lookup: the continuation of the longest n-gram ending x at its
                                            latest earlier occurrence in x, q_i = one-hot(x̃_i), γ chosen
                                            per round (:class:`LookupPolicy`);
                                            draft model: x̃_i ~ q_i = M_q(x, x̃_<i), one M_q step each
    verify    p_1 .. p_γ+1 = M_p(y, x̃_1 .. x̃_γ)    one forward over γ + 1 positions (KV cache reused)
    accept    greedy:   n = longest prefix with x̃_i = argmax p_i
              sampling: for i = 1..γ, r_i ~ U(0, 1): accept x̃_i while r_i < min(1, p_i(x̃_i) / q_i(x̃_i))
    correct   greedy:   t = argmax p_n+1
              sampling: t ~ norm(max(0, p_n+1 - q_n+1)) after a rejection, t ~ p_γ+1 if all were accepted
    emit      x̃_1 .. x̃_n, t                  n + 1 tokens for one target forward
    roll back both KV caches to x, x̃_1 .. x̃_n  (the static cache's later positions are simply overwritten)

``p_i`` and ``q_i`` are the processed distributions, the same sampler chain the plain loop uses
(:func:`llmcourse.decoding.samplers.apply_chain`, with the context ``x, x̃_<i``): greedy applies only the
penalties and takes the argmax. Greedy output is therefore token-identical to plain greedy decoding
(up to ties broken differently by a float rounding of the multi-token forward), and sampled output has
exactly the target's distribution (Leviathan et al., Theorem 1: ``P(t = v) = min(p, q)(v) + (1 - β)
norm(max(0, p - q))(v) = p(v)``, ``β = Σ min(p, q)``), but a different random stream from the plain
loop, so the same seed gives other samples.

Reported: the acceptance rate ``α̂ = accepted / drafted`` and the tokens per target forward (the
prompt's forward counts; plain decoding has exactly 1). The speed-up is about tokens per forward
divided by what a (γ + 1)-position forward plus the drafting cost relative to a one-token step.

Prompt lookup's draft length: a copy that has matched ``L`` tokens goes on for one more with
probability ``a(L)`` (rising with ``L``, estimated per generation), so ``γ`` drafts give ``E_γ = 1 +
Σ_j Π_{i≤j} a(L + i - 1)`` tokens for a verification costing ``c(γ + 1)`` one-token steps (measured per
width); each round takes the ``γ`` (0 included: a plain step) maximising ``E_γ - ρ c(γ + 1)``, ``ρ`` the
tokens per step so far (:class:`LookupPolicy`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.runtime import DecodeSession, FastModel, supports
from llmcourse.decoding import samplers
from llmcourse.decoding.engine import (
    COMPILE_MIN_STEPS,
    GeneratedSequence,
    GenerationConfig,
    GenerationOutput,
    TextStream,
    check_fits,
    encode_prompt,
    flush_stream,
    model_eos_ids,
    prepare,
    push_stream,
    sequence_text,
    text_stream,
)

log = logging.getLogger(__name__)

MODES = ("off", "lookup", "draft")
MAX_DRAFT_TOKENS = 64
DRAFT_TOKENS = 3  # a draft model's γ: each drafted token costs a draft step, and 4 positions one width
# prompt lookup's most drafted tokens per round (it drafts fewer, or none, when they are unlikely to pay):
# 8 positions, measured 2.9x a one-token step (1 thread, fp32); 12 positions (4.2x) seldom repaid their cost
LOOKUP_DRAFT_TOKENS = 7


@dataclass
class SpeculativeConfig:
    """How to draft (``off``, ``lookup``, ``draft``), how many tokens per round, and the draft model."""

    speculative: str = option("off", "speculative decoding: lookup (draft by prompt lookup: copy what followed "
                              "the last n-gram earlier in the text) or draft (a smaller --draft-model with the "
                              "same tokenizer); output is unchanged (greedy) or has the same distribution "
                              "(sampling). Default: %(default)s", choices=MODES)
    draft_tokens: int | None = option(None, "drafted tokens per round (γ), verified in one forward of the model: "
                                      "--speculative draft drafts this many; lookup at most this many, as many "
                                      f"as are worth their verification (none when nothing is). Default: "
                                      f"{LOOKUP_DRAFT_TOKENS} for lookup, {DRAFT_TOKENS} for draft")
    lookup_ngram: int = option(3, "--speculative lookup: the longest n-gram looked up: the last N tokens, else "
                               "fewer down to 1, at their latest earlier occurrence. Default: %(default)s")
    draft_model: str | None = option(None, "--speculative draft: the draft model (same forms as --model; it must "
                                     "share the model's vocabulary)", metavar="M")

    def __post_init__(self) -> None:
        if self.speculative not in MODES:
            raise UserError(f"--speculative {self.speculative!r} is invalid", "pass one of " + "|".join(MODES))
        if self.draft_tokens is None:
            self.draft_tokens = LOOKUP_DRAFT_TOKENS if self.speculative == "lookup" else DRAFT_TOKENS
        if not isinstance(self.draft_tokens, int) or not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise UserError(f"--draft-tokens {self.draft_tokens!r} is invalid",
                            f"pass --draft-tokens between 1 and {MAX_DRAFT_TOKENS}")
        if not isinstance(self.lookup_ngram, int) or not 1 <= self.lookup_ngram <= 64:
            raise UserError(f"--lookup-ngram {self.lookup_ngram!r} is invalid", "pass --lookup-ngram between 1 and 64")
        if self.speculative == "draft" and not self.draft_model:
            raise UserError("--speculative draft needs a draft model", "pass --draft-model M (a smaller model with "
                            "the same tokenizer), or use --speculative lookup")
        if self.draft_model and self.speculative != "draft":
            raise UserError("--draft-model is used only by --speculative draft", "add --speculative draft")

    @property
    def enabled(self) -> bool:
        return self.speculative != "off"


# --- drafters ------------------------------------------------------------------------------------

class PromptLookup:
    """Prompt lookup drafting: the continuation of an earlier occurrence of the text's last tokens.

    The longest n-gram ending the text, ``n`` = ``max_n`` down to ``min_n`` (transformers' prompt lookup
    searches ``max_matching_ngram_size`` down to 1; llama.cpp's ``lookup`` keeps n-gram caches of the
    context), that occurred before. Of a ``max_n``-gram's occurrences (the last :data:`LOOKUP_CANDIDATES`),
    the one whose match extends furthest back wins, the latest on a tie; a shorter n-gram's latest
    occurrence. An index per size from each n-gram to the positions after its occurrences, grown as the
    text grows (O(max_n) per new token), so drafting never rescans the prompt. :meth:`match` also says how
    long the matched span is: the longer the text has been copying, the likelier the copy goes on
    (:class:`LookupPolicy`)."""

    def __init__(self, n: int, min_n: int | None = None) -> None:
        self.n = n
        self.min_n = n if min_n is None else min_n
        if not 1 <= self.min_n <= self.n:
            raise ValueError(f"n-gram sizes {self.min_n}..{self.n} are invalid")
        self.last: dict[int, dict[tuple[int, ...], int]] = {m: {} for m in range(self.min_n, n)}
        self.every: dict[tuple[int, ...], list[int]] = {}  # max_n-gram -> positions after its occurrences
        self.indexed = 0  # n-grams ending before this position are indexed

    def _index(self, tokens: Sequence[int]) -> None:
        end = len(tokens) - 1  # the current suffix ends here: index the n-grams ending before it
        for j in range(self.indexed, end):
            for m, last in self.last.items():
                if j >= m - 1:
                    last[tuple(tokens[j - m + 1:j + 1])] = j + 1
            if j >= self.n - 1:
                self.every.setdefault(tuple(tokens[j - self.n + 1:j + 1]), []).append(j + 1)
        self.indexed = max(self.indexed, end)

    @staticmethod
    def _extent(tokens: Sequence[int], start: int, length: int) -> int:
        """How far back the span before ``start`` equals the text's end, given that ``length`` tokens do."""
        size = len(tokens)
        while (length < MAX_MATCH and start - length - 1 >= 0
               and tokens[start - length - 1] == tokens[size - length - 1]):
            length += 1
        return length

    def match(self, tokens: Sequence[int]) -> tuple[int, int]:
        """``(start, length)``: the copy's continuation begins at ``tokens[start]``, after an earlier span
        equal to the last ``length`` tokens (``length`` up to :data:`MAX_MATCH`); ``(0, 0)`` when no n-gram
        of ``min_n`` .. ``n`` tokens ending the text occurred before."""
        self._index(tokens)
        size = len(tokens)
        if size > self.n:
            starts = self.every.get(tuple(tokens[size - self.n:]))
            if starts:
                best = (0, 0)
                for start in reversed(starts[-LOOKUP_CANDIDATES:]):
                    length = self._extent(tokens, start, self.n)
                    if length > best[1]:
                        best = (start, length)
                return best
        for m in range(min(self.n - 1, size - 1), self.min_n - 1, -1):
            start = self.last[m].get(tuple(tokens[size - m:]))
            if start is not None:  # m tokens exactly: m + 1 would have matched the (m + 1)-gram
                return start, m
        return 0, 0

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last n-gram of ``tokens`` before (or none)."""
        start, length = self.match(tokens)
        return list(tokens[start:start + k]) if length else []


LOOKUP_CANDIDATES = 16  # the latest occurrences of the longest n-gram compared by their match's length
# P(the next token goes on copying | the text's last L tokens equal an earlier span), L = 1, 2, ...
# (the last entry for longer matches): the prior of :class:`LookupPolicy`'s estimate, rounded from greedy
# summaries of 6 Wikipedia extracts by the default model (bench/speculative.py's grounded prompts; 570
# positions: 0.25 after a 1-token match, 0.56-0.68 after 2-5, 0.78-0.88 after 6-9, 0.94 after 12+).
PRIOR_ACCEPT = (0.25, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.85, 0.9, 0.9, 0.9)
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed draft positions per match length
MAX_MATCH = 32  # match lengths are measured up to this


class LookupPolicy:
    """How many looked-up tokens to verify: the draft length with the most expected tokens per unit of
    verification cost.

    With ``a(L)`` the probability that a copy which has matched ``L`` tokens goes on for one more (its
    estimate: the observed acceptances of this generation at that match length, with :data:`PRIOR_ACCEPT`
    counting :data:`PRIOR_WEIGHT` observations), ``k`` drafted tokens after a match of ``L`` give::

        E_k = 1 + Σ_{j=1..k} Π_{i=1..j} a(L + i - 1)      tokens (the accepted drafts and the model's own)

    for a verification of ``k + 1`` positions costing ``c(k + 1)`` one-token steps (measured per width:
    :func:`verify_costs`). The long-run rate is Σ tokens / Σ cost over the rounds; the round that maximises
    ``E_k - ρ c(k + 1)``, with ``ρ`` the rate so far (at least 1: plain steps alone make 1 token per step),
    raises it the most (Dinkelbach's rule for a ratio of sums; maximising ``E_k / c(k + 1)`` itself would
    refuse a longer draft whose extra tokens come at a better rate than ``ρ`` but a worse one than the
    short draft's), so ``k = 0`` (a plain step) whenever no draft is worth its cost."""

    def __init__(self, max_tokens: int, cost: Callable[[int], float], prior: Sequence[float] = PRIOR_ACCEPT,
                 weight: float = PRIOR_WEIGHT, rate: float = 1.0) -> None:
        self.max_tokens = max_tokens
        self.cost = cost  # positions verified -> cost in one-token steps
        self.prior = tuple(prior)
        self.weight = weight
        self.hits = [0] * len(self.prior)
        self.seen = [0] * len(self.prior)
        self.tokens, self.spent = rate * weight, weight  # the rate so far, starting from ``rate``

    def _bucket(self, length: int) -> int:
        return min(length, len(self.prior)) - 1

    def accept_prob(self, length: int) -> float:
        """The estimate of ``a(length)``."""
        b = self._bucket(length)
        return (self.hits[b] + self.weight * self.prior[b]) / (self.seen[b] + self.weight)

    def expected_tokens(self, length: int, k: int) -> float:
        """``E_k`` after a match of ``length`` tokens."""
        total, p = 1.0, 1.0
        for i in range(k):
            p *= self.accept_prob(length + i)
            total += p
        return total

    def choose(self, length: int, available: int) -> int:
        """The draft length (0: a plain step) after a match of ``length`` tokens, at most ``available``."""
        if length <= 0:
            return 0
        rate = max(1.0, self.tokens / self.spent)  # plain steps alone make 1 token per step
        best_k, best = 0, 1.0 - rate * self.cost(1)
        total, p = 1.0, 1.0
        for k in range(1, min(available, self.max_tokens) + 1):
            p *= self.accept_prob(length + k - 1)
            total += p
            gain = total - rate * self.cost(k + 1)
            if gain > best + 1e-9:
                best_k, best = k, gain
        return best_k

    def observe(self, length: int, drafted: int, accepted: int) -> None:
        """A round after a match of ``length``: ``drafted`` tokens verified, the first ``accepted`` right.
        Draft ``j`` (0-based) is evidence about ``a(length + j)`` only if all before it were accepted."""
        for j in range(min(accepted + 1, drafted)):
            b = self._bucket(length + j)
            self.seen[b] += 1
            self.hits[b] += j < accepted
        self.tokens += accepted + 1
        self.spent += self.cost(drafted + 1)


EAGER_COST_SLOPE = 0.25  # the uncompiled path's verification of t positions: about 1 + 0.25 (t - 1) steps
CALIBRATION_REPS = 5  # the fastest of these many interleaved runs per width: robust to a busy machine
_COSTS: weakref.WeakKeyDictionary[FastModel, dict[tuple[int, int], dict[int, float]]] = weakref.WeakKeyDictionary()


def verify_costs(fast: FastModel, capacity: int, max_tokens: int) -> Callable[[int], float]:
    """The cost of verifying ``t`` positions (the last token and ``t - 1`` drafts), in one-token steps.

    On the compiled path a verification runs at a width of ``VERIFY_WIDTHS`` (``t`` padded up), and each
    width's time is measured here: the fastest of :data:`CALIBRATION_REPS` interleaved runs of every width
    against the one-token step (the compiled steps attend over the whole static cache, so a width's time
    does not depend on the position), once per model, cache size and thread count. The products of a few
    positions turn compute-bound on a CPU, so these ratios depend on the machine, the threads and the
    weights' format. The uncompiled path (small models) runs ``t`` positions unpadded: ``1 + EAGER_COST_SLOPE
    (t - 1)``, not measured."""
    if fast.matvec != "compiled" or not fast.multi_ok:
        return lambda t: 1.0 + EAGER_COST_SLOPE * (t - 1)
    cap = fast.cache_size(capacity)
    widths = sorted({1, *(fast.verify_width(t) for t in range(2, max_tokens + 2))})
    held = _COSTS.setdefault(fast, {})
    key = (cap, torch.get_num_threads())
    if not set(widths) <= set(held.get(key, {})):
        best = dict.fromkeys(widths, float("inf"))
        session = fast.session(1, cap)
        with torch.inference_mode():
            for _ in range(CALIBRATION_REPS):
                for w in widths:
                    session.pos = 1
                    t0 = time.perf_counter()
                    if w == 1:
                        session.forward(torch.zeros(1, 1, dtype=torch.long))
                    else:
                        session.forward(torch.zeros(1, w, dtype=torch.long), all_logits=True)
                    best[w] = min(best[w], time.perf_counter() - t0)
        held[key] = {w: best[w] / best[1] for w in widths}
        log.info("verification cost per width (one-token steps): %s",
                 ", ".join(f"{w}: {c:.2f}" for w, c in held[key].items()))
    costs = held[key]
    return lambda t: costs[fast.verify_width(t)] if t > 1 else 1.0


class DraftModel:
    """A smaller model ``M_q`` drafting autoregressively on its own KV cache, rolled back on rejection."""

    def __init__(self, fast: FastModel) -> None:
        self.fast = fast
        self.session: DecodeSession | None = None

    def start(self, prompt: list[int], capacity: int) -> None:
        self.session = self.fast.session(1, capacity)
        self.session.prefill(torch.tensor([prompt]))

    def propose(self, tokens: list[int], k: int, q_of: Callable[[torch.Tensor, list[int]], torch.Tensor],
                greedy: bool, generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """``k`` tokens drafted from ``tokens`` and their distributions ``q_i`` (V,) (processed, as the target's).

        The cache holds a prefix of ``tokens``; what it lacks (the last token, and after a fully accepted
        round the last draft too) is run first, in one forward."""
        s = self.session
        new = tokens[s.pos:]
        # one token, or two after a fully accepted round (the last draft, then the target's token): the
        # multi-token step, which the compiled runtime runs as one compiled call
        logits = s.forward(torch.tensor([new]), all_logits=True)[:, -1] if len(new) > 1 else s.forward(
            torch.tensor([new]))
        drafted: list[int] = []
        qs: list[torch.Tensor] = []
        for i in range(k):
            q = q_of(logits, tokens + drafted)
            tok = int(torch.argmax(q)) if greedy else int(samplers.sample(q.view(1, -1), generator)[0])
            drafted.append(tok)
            qs.append(q)
            if i + 1 < k:
                logits = s.step(torch.tensor([tok]))
        return drafted, qs

    def rollback(self, pos: int) -> None:
        self.session.rollback(min(pos, self.session.pos))


# --- records and output ----------------------------------------------------------------------------

@dataclass
class Round:
    """One target forward: what was drafted, how many the target accepted, and its own token."""

    start: int  # index in the generated tokens of the round's first new token
    drafted: list[int]
    accepted: int
    token: int | None  # the target's own token (None when the generation stopped inside the accepted drafts)


@dataclass
class SpeculativeStats:
    mode: str
    draft_tokens: int
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0  # the prompt's forward included
    plain_steps: int = 0  # target forwards after the prompt's that verified no draft (nothing worth drafting)
    draft_forwards: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.generated / self.target_forwards if self.target_forwards else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "draft_tokens": self.draft_tokens, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "target_forwards": self.target_forwards, "plain_steps": self.plain_steps,
                "draft_forwards": self.draft_forwards,
                "tokens_per_target_forward": self.tokens_per_target_forward}


@dataclass
class SpeculativeOutput(GenerationOutput):
    stats: SpeculativeStats | None = None
    rounds: list[list[Round]] = field(default_factory=list)  # per returned sequence, if record=True

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["speculative"] = self.stats.to_json() if self.stats is not None else None
        return data


# --- the loop ------------------------------------------------------------------------------------

def check_draft_model(model: Any, draft: Any, tokenizer: Any = None, draft_tokenizer: Any = None) -> None:
    """Refuse a draft model whose vocabulary is not the target's (its token ids would mean other text)."""
    v_p = getattr(getattr(model, "config", None), "vocab_size", None)
    v_q = getattr(getattr(draft, "config", None), "vocab_size", None)
    same = v_p == v_q
    if same and tokenizer is not None and draft_tokenizer is not None:
        same = tokenizer.get_vocab() == draft_tokenizer.get_vocab()
    if not same:
        raise UserError(f"the draft model's vocabulary ({v_q} tokens) is not the model's ({v_p} tokens)",
                        "pass a --draft-model that shares the model's tokenizer")


def _runtime(model: Any, backend: str, steps: int) -> FastModel:
    if isinstance(model, FastModel):
        return model
    if backend == "hf" or not supports(model):
        raise UserError("speculative decoding runs on the fast backend (the model runtime)",
                        "drop --backend hf, or use a model of an architecture the runtime supports")
    return prepare(model, "mm" if steps < COMPILE_MIN_STEPS else "auto")


def _widest(spec: SpeculativeConfig) -> int:
    """The most tokens one verification runs (the last token and the drafts)."""
    return spec.draft_tokens + 1


def _capacity(fast: FastModel, prompt: int, cfg: GenerationConfig, spec: SpeculativeConfig) -> int:
    """KV cache positions for a sequence: the prompt, the new tokens, and room for the padding of the last
    verification (the compiled multi-token step pads to :meth:`~llmcourse.core.runtime.FastModel.verify_width`)."""
    return prompt + cfg.max_new_tokens + fast.verify_width(_widest(spec))


def _accept(ps: torch.Tensor, drafted: list[int], qs: list[torch.Tensor] | None, greedy: bool,
            generator: torch.Generator | None) -> tuple[int, int]:
    """Verification: ``ps`` (γ + 1, V) the target's processed distributions (or processed logits, greedy),
    ``qs`` the draft's (None: lookup, q_i = one-hot). Returns (accepted n, the target's token)."""
    for i, x in enumerate(drafted):
        p = ps[i]
        if greedy:
            t = int(torch.argmax(p))
            if t != x:
                return i, t
            continue
        q_x = 1.0 if qs is None else float(qs[i][x])
        r = float(torch.rand((), generator=generator))
        if r * q_x < float(p[x]):  # r < min(1, p(x) / q(x))
            continue
        residual = p.clone()
        if qs is None:
            residual[x] = 0.0  # max(0, p - one-hot(x)): p with x taken out
        else:
            residual = (p - qs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere only if p == q: then x is never rejected
            residual = p
        return i, int(samplers.sample(residual.view(1, -1), generator)[0])
    last = ps[len(drafted)]
    t = int(torch.argmax(last)) if greedy else int(samplers.sample(last.view(1, -1), generator)[0])
    return len(drafted), t


def _one_sequence(fast: FastModel, drafter: PromptLookup | DraftModel | None, prompt: list[int],
                  cfg: GenerationConfig, spec: SpeculativeConfig, eos: set[int], stream: TextStream | None,
                  on_text: Callable[[str], None] | None, generator: torch.Generator | None,
                  stats: SpeculativeStats, cost: Callable[[int], float] | None
                  ) -> tuple[list[int], float, str, list[Round]]:
    greedy = cfg.strategy != "sample"
    order = samplers.CHAINS[cfg.chain]

    def processed(logits: torch.Tensor, context: list[int]) -> torch.Tensor:
        """The plain loop's processed scores of the next token after ``context``: probabilities when
        sampling, the penalised logits (argmax only) for greedy."""
        z = samplers.apply_chain(logits.view(1, -1).float(), torch.tensor([context]), cfg, order, sampling=not greedy)
        return z[0] if greedy else torch.softmax(z[0], dim=-1)

    capacity = _capacity(fast, len(prompt), cfg, spec)
    target = fast.session(1, capacity)
    logits = target.prefill(torch.tensor([prompt]))  # (1, V): the first new token's
    stats.target_forwards += 1
    if isinstance(drafter, DraftModel):
        drafter.start(prompt, capacity)
    policy = None
    if isinstance(drafter, PromptLookup):  # a fresh index and estimate per sequence
        drafter, policy = PromptLookup(spec.lookup_ngram, 1), LookupPolicy(spec.draft_tokens, cost)
    tokens = list(prompt)
    out: list[int] = []
    rounds: list[Round] = []
    score, reason = 0.0, "length"

    def emit(tok: int, raw: torch.Tensor) -> bool:
        """Append one token (``raw`` its unprocessed logits, for the score); True when generation ends."""
        nonlocal score, reason
        score += float(torch.log_softmax(raw.float(), dim=-1)[tok])
        out.append(tok)
        tokens.append(tok)
        if push_stream(stream, tok, on_text):
            reason = "stop"
            return True
        if tok in eos:
            reason = "eos"
            return True
        return len(out) >= cfg.max_new_tokens

    # the first token comes from the prompt's forward, as in the plain loop
    _, first = _accept(processed(logits[0], tokens).view(1, -1), [], None, greedy, generator)
    done = emit(first, logits[0])
    while not done:
        k = min(spec.draft_tokens, cfg.max_new_tokens - len(out) - 1)  # the target's own token always fits
        qs = None
        drafted: list[int] = []
        length = 0  # lookup: how many tokens the copy has matched
        if k > 0 and isinstance(drafter, DraftModel):
            drafted, qs = drafter.propose(tokens, k, processed, greedy, generator)
            stats.draft_forwards += k
        elif k > 0 and policy is not None:
            start, length = drafter.match(tokens)
            drafted = tokens[start:start + policy.choose(length, min(k, len(tokens) - start))]
        base = target.pos  # == len(tokens) - 1: the cache holds everything but the last token
        if drafted:
            raw = target.forward(torch.tensor([[tokens[-1], *drafted]]), all_logits=True)[0]  # (γ + 1, V)
        else:
            raw = target.step(torch.tensor([tokens[-1]]))  # nothing to verify: a plain step
        stats.target_forwards += 1
        ps = torch.stack([processed(raw[i], tokens + drafted[:i]) for i in range(len(drafted) + 1)])
        n, t = _accept(ps, drafted, qs, greedy, generator)
        if policy is not None:
            policy.observe(length, len(drafted), n)
        stats.drafted += len(drafted)
        stats.plain_steps += not drafted
        stats.accepted += n
        rounds.append(Round(len(out), drafted, n, t))
        for i in range(n):
            if emit(drafted[i], raw[i]):
                done = True
                rounds[-1].token = None
                break
        else:
            done = emit(t, raw[n])
        target.rollback(base + 1 + n)  # keep y and the accepted drafts; t is the next round's first input
        if isinstance(drafter, DraftModel):
            drafter.rollback(base + 1 + n)
    flush_stream(stream, on_text)
    return out, score, reason, rounds


def speculative_generate(model: Any, tokenizer: Any, prompt: str | list[int], config: GenerationConfig | None = None,
                         spec: SpeculativeConfig | None = None, *, draft_model: Any = None,
                         draft_tokenizer: Any = None, on_text: Callable[[str], None] | None = None,
                         record: bool = False) -> SpeculativeOutput:
    """:func:`llmcourse.decoding.generate` with speculative decoding (greedy or sampling).

    ``spec.speculative`` ``lookup`` drafts by prompt lookup; ``draft`` by ``draft_model`` (a loaded
    transformers causal LM or FastModel with the same vocabulary; ``spec.draft_model`` is only its
    name). ``record`` keeps every round (:class:`Round`) for :func:`draw_strip`.
    """
    cfg = config or GenerationConfig()
    spec = spec or SpeculativeConfig("lookup")
    if not spec.enabled:
        raise UserError("speculative_generate needs --speculative lookup or draft", "pass one, or use generate()")
    if cfg.strategy == "beam":
        raise UserError("speculative decoding verifies one sequence: it does not run beam search",
                        "use --strategy greedy or sample with --speculative")
    if spec.speculative == "draft" and draft_model is None:
        raise UserError("--speculative draft needs a draft model", "pass --draft-model M")
    prompt_ids = encode_prompt(tokenizer, prompt)
    check_fits(model, prompt_ids, cfg)
    eos_list = list(cfg.eos_token_ids) if cfg.eos_token_ids is not None else model_eos_ids(model, tokenizer)
    steps = cfg.num_return_sequences * cfg.max_new_tokens
    fast = _runtime(model, cfg.backend, steps)
    capacity = _capacity(fast, len(prompt_ids), cfg, spec)
    drafter: PromptLookup | DraftModel | None
    if spec.speculative == "draft":
        check_draft_model(model, draft_model, tokenizer, draft_tokenizer)
        drafter = DraftModel(_runtime(draft_model, cfg.backend, steps))
        drafter.fast.warmup(1, capacity, tokens=2)  # after a fully accepted round it runs 2 tokens
    else:
        drafter = PromptLookup(spec.lookup_ngram)
    for n in sorted({fast.verify_width(t) for t in range(2, _widest(spec) + 1)}):  # compiled outside the timing
        fast.warmup(1, capacity, tokens=n)
    cost = verify_costs(fast, capacity, spec.draft_tokens) if spec.speculative == "lookup" else None
    stats = SpeculativeStats(spec.speculative, spec.draft_tokens)
    sequences: list[GeneratedSequence] = []
    rounds: list[list[Round]] = []
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(cfg.num_return_sequences):
            stream = text_stream(tokenizer, cfg, on_text)
            toks, sc, reason, rec = _one_sequence(fast, drafter, prompt_ids, cfg, spec, set(eos_list), stream,
                                                  on_text if i == 0 else None, generator, stats, cost)
            text = sequence_text(stream, tokenizer, toks)
            sequences.append(GeneratedSequence(toks, text, sc, reason))
            stats.generated += len(toks)
            if record:
                rounds.append(rec)
    seconds = time.perf_counter() - t0
    return SpeculativeOutput(prompt_ids, sequences, seconds, stats.generated, "fast", stats=stats, rounds=rounds)


# --- the picture -----------------------------------------------------------------------------------

COLORS = {"accepted": "#66bd63", "rejected": "#f46d43", "target": "#74add1"}


def draw_strip(rounds: Sequence[Round], tokenizer: Any, path: str | Path, title: str = "",
               max_rounds: int = 40) -> None:
    """One row per target forward: the drafted tokens the target accepted (green), its own token (blue),
    then the drafted tokens it rejected (red, dashed); the row's label is the position of its first token
    and the number of tokens that forward produced. Written atomically to ``path`` (.png/.svg)."""
    import matplotlib as mpl

    from llmcourse.decoding.tree import _figure, _save, _tok

    shown = list(rounds)[:max_rounds]
    width = max((len(r.drafted) + 1 for r in shown), default=1)
    fig = _figure(1.15 * width + 2.4, 0.36 * len(shown) + 1.4)
    ax = fig.add_subplot(1, 1, 1)

    def cell(x: float, y: float, tok: int, kind: str) -> None:
        ls, lw, alpha = ("--", 0.8, 0.6) if kind == "rejected" else ("-", 1.4 if kind == "target" else 0.8, 1.0)
        ax.text(x, y, _tok(tokenizer, tok)[:10], ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.25", fc=COLORS[kind], ec="#333", lw=lw, ls=ls, alpha=alpha))

    for y, r in enumerate(shown):
        for i in range(r.accepted):
            cell(i, y, r.drafted[i], "accepted")
        x = r.accepted
        if r.token is not None:
            cell(x, y, r.token, "target")
            x += 1
        for tok in r.drafted[r.accepted:]:
            cell(x, y, tok, "rejected")
            x += 1
        made = r.accepted + (r.token is not None)
        ax.text(-0.8, y, f"{r.start + 1}", ha="right", va="center", fontsize=8, color="#555")
        ax.text(width - 0.3, y, f"+{made}", ha="left", va="center", fontsize=8, color="#333")
    ax.set_xlim(-1.6, width + 0.5)
    ax.set_ylim(len(shown) - 0.4, -0.9)
    ax.text(-0.8, -0.8, "token #", ha="right", va="center", fontsize=8, color="#555")
    ax.axis("off")
    handles = [mpl.patches.Patch(fc=COLORS["accepted"], ec="#333", label="drafted, accepted"),
               mpl.patches.Patch(fc=COLORS["target"], ec="#333", label="the model's own token"),
               mpl.patches.Patch(fc=COLORS["rejected"], ec="#333", ls="--", label="drafted, rejected")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)
