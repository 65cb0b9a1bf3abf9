"""Speculative decoding: several tokens per forward of the big model when a cheap guess is right.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (their
names: target model ``M_p``, draft model ``M_q``, ``γ`` drafted tokens), and Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling". Prompt lookup (Saxena 2023,
transformers' ``prompt_lookup_num_tokens``, llama.cpp's ``lookup``) drafts without a second model.

Decoding one token costs one pass over the target's weights whether it scores 1 position or a few
(a step is bound by reading the weights). So: guess ``γ`` tokens cheaply, score all of them in ONE
forward of ``M_p``, keep the longest prefix the target agrees with, and get one token of the
target's own for free. One round, with ``x`` the text so far and ``y`` its last token::

    draft     x̃_1 .. x̃_γ                     lookup: the continuation of the last n-gram's most recent
                                            earlier occurrence in x, q_i = one-hot(x̃_i);
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
"""

from __future__ import annotations

import logging
import time
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
    model_eos_ids,
    prepare,
)

log = logging.getLogger(__name__)

MODES = ("off", "lookup", "draft")
MAX_DRAFT_TOKENS = 64


@dataclass
class SpeculativeConfig:
    """How to draft (``off``, ``lookup``, ``draft``), how many tokens per round, and the draft model."""

    speculative: str = option("off", "speculative decoding: lookup (draft by prompt lookup: copy what followed "
                              "the last n-gram earlier in the text) or draft (a smaller --draft-model with the "
                              "same tokenizer); output is unchanged (greedy) or has the same distribution "
                              "(sampling). Default: %(default)s", choices=MODES)
    draft_tokens: int = option(3, "drafted tokens per round (γ): at most this many are verified in one forward "
                               "of the model. Default: %(default)s")
    lookup_ngram: int = option(3, "--speculative lookup: the n-gram (the last N tokens) whose earlier occurrence "
                               "is looked up. Default: %(default)s")
    draft_model: str | None = option(None, "--speculative draft: the draft model (same forms as --model; it must "
                                     "share the model's vocabulary)", metavar="M")

    def __post_init__(self) -> None:
        if self.speculative not in MODES:
            raise UserError(f"--speculative {self.speculative!r} is invalid", "pass one of " + "|".join(MODES))
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
    """Prompt lookup drafting: the continuation of the most recent earlier occurrence of the last n tokens.

    An index from each n-gram of the text to the position after its latest occurrence, grown as the
    text grows (O(1) per new token), so drafting never rescans the prompt."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token that followed it
        self.indexed = 0  # n-grams ending before this position are in ``last``

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last ``n`` tokens of ``tokens`` before (or none)."""
        n = self.n
        end = len(tokens) - 1  # the current suffix ends here: index the n-grams ending before it
        for j in range(max(self.indexed, n - 1), end):
            self.last[tuple(tokens[j - n + 1:j + 1])] = j + 1
        self.indexed = max(self.indexed, end)
        if len(tokens) < n:
            return []
        start = self.last.get(tuple(tokens[-n:]))
        return [] if start is None else list(tokens[start:start + k])


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
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
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


def lookup_gamma(base: int, drafted: int, accepted: int, asked: int) -> int:
    """Prompt lookup's next draft length: ``2 γ + 1`` after a round whose ``asked`` drafts were all found and
    accepted (a copied span tends to go on: with γ = 3, 4 then 8 verified positions, the runtime's widths),
    else ``base``. A verification of 8 positions costs more than one of 4, so only likely drafts get it."""
    return 2 * base + 1 if 0 < drafted == asked and accepted == drafted else base


def _widest(spec: SpeculativeConfig) -> int:
    """The most tokens one verification runs (the last token and the drafts)."""
    return (2 * spec.draft_tokens + 1 if spec.speculative == "lookup" else spec.draft_tokens) + 1


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
                  stats: SpeculativeStats) -> tuple[list[int], float, str, list[Round]]:
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
    elif isinstance(drafter, PromptLookup):
        drafter = PromptLookup(spec.lookup_ngram)  # a fresh index per sequence
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
        if stream is not None:
            piece = stream.push(tok)
            if piece and on_text is not None:
                on_text(piece)
            if stream.stopped:
                reason = "stop"
                return True
        if tok in eos:
            reason = "eos"
            return True
        return len(out) >= cfg.max_new_tokens

    # the first token comes from the prompt's forward, as in the plain loop
    _, first = _accept(processed(logits[0], tokens).view(1, -1), [], None, greedy, generator)
    done = emit(first, logits[0])
    gamma = spec.draft_tokens
    while not done:
        k = min(gamma, cfg.max_new_tokens - len(out) - 1)  # the target's own token always fits
        qs = None
        drafted: list[int] = []
        if k > 0 and isinstance(drafter, DraftModel):
            drafted, qs = drafter.propose(tokens, k, processed, greedy, generator)
            stats.draft_forwards += k
        elif k > 0 and drafter is not None:
            drafted = drafter.propose(tokens, k)
        base = target.pos  # == len(tokens) - 1: the cache holds everything but the last token
        if drafted:
            raw = target.forward(torch.tensor([[tokens[-1], *drafted]]), all_logits=True)[0]  # (γ + 1, V)
        else:
            raw = target.step(torch.tensor([tokens[-1]]))  # nothing to verify: a plain step
        stats.target_forwards += 1
        ps = torch.stack([processed(raw[i], tokens + drafted[:i]) for i in range(len(drafted) + 1)])
        n, t = _accept(ps, drafted, qs, greedy, generator)
        if isinstance(drafter, PromptLookup):
            gamma = lookup_gamma(spec.draft_tokens, len(drafted), n, k)
        stats.drafted += len(drafted)
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
    if stream is not None and on_text is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
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
    for n in sorted({spec.draft_tokens + 1, _widest(spec)}):  # compiles the steps outside the timing
        fast.warmup(1, capacity, tokens=n)
    stats = SpeculativeStats(spec.speculative, spec.draft_tokens)
    sequences: list[GeneratedSequence] = []
    rounds: list[list[Round]] = []
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(cfg.num_return_sequences):
            stream = TextStream(tokenizer, cfg.stop) if tokenizer is not None and (on_text or cfg.stop) else None
            toks, sc, reason, rec = _one_sequence(fast, drafter, prompt_ids, cfg, spec, set(eos_list), stream,
                                                  on_text if i == 0 else None, generator, stats)
            text = stream.text if stream is not None else (
                tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else "")
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
