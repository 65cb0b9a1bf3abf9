"""Log-likelihood scoring of multiple-choice requests, as lm-evaluation-harness 0.4.13's ``hf`` model, with the
shared context computed once (prefix sharing).

**Tokenisation** (lm-eval ``TemplateLM._encode_pair``): trailing whitespace of the context moves to the
continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)``, ``cont = whole[len(ctx):]``;
the model reads ``(ctx + cont)[-(L + 1):][:-1]`` (``L`` the model's context length) and the continuation's
log-likelihood is

    ll = sum_j log softmax(logits_{|ctx| - 1 + j})[cont_j],     is_greedy = all_j argmax(logits_{|ctx|-1+j}) == cont_j

``encode`` is the tokenizer's ``encode`` with its default special tokens (lm-eval's ``add_bos_token=None``), and
``add_special_tokens=False`` when the text already starts with the prefix token; an empty context is replaced
by the prefix token (BOS, else EOS).

**Two paths, one result.** By default (:mod:`.packing`, for the transformers families whose forward takes a 4D
mask and position ids) each question is written once as a tree of its choices and many questions run in one
forward, the LM head only on the rows read. Every other model takes the cached path below, one question per call.

**Prefix sharing (the cached path).** The choices of one question share their context, so their token sequences share a prefix
of ``c`` tokens (the longest common prefix, at most the shortest context). We run it once with the K/V cache
on (``past_key_values`` (``cache`` since transformers 5.24) of the ordinary transformers forward, keeping only its last position's logits), then
score every choice's remaining tokens in one right-padded batch that reads the prefix from a copy of that
cache. Right padding wastes no attention: a padded position is later than every scored one. The result equals
the full forward up to floating-point summation order (tested to 1e-4 against lm-eval).

**Metrics** (lm-eval ``ConfigurableTask.process_results``): ``acc = [argmax_i ll_i == gold]``, ``acc_norm =
[argmax_i ll_i / len(choice_i) == gold]`` with ``len`` the choice string's length in *characters* (what
lm-eval 0.4.13 computes; ``acc_bytes`` divides by UTF-8 bytes), ties going to the first choice (``np.argmax``).
The standard error is lm-eval's ``mean_stderr``: the sample standard deviation (``n - 1``) over ``sqrt(n)``;
a group (MMLU) reports the size-weighted mean and the pooled standard error
``sqrt(sum_i (n_i - 1) n_i se_i^2 / (sum_i n_i - k) / sum_i n_i)``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmcourse.core.errors import UserError
from llmcourse.evaluation.packing import build_tree, common_prefix, packable, score_trees

# --- tokenisation -------------------------------------------------------------------------------------------

def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's ``prefix_token_id``: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval ``HFLM.tok_encode`` with ``add_bos_token=None``: the tokenizer's default special tokens, none when
    the text already starts with the prefix token."""
    kw: dict[str, Any] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None:
        pid = prefix_token_id(tokenizer)
        if pid is not None and text.startswith(tokenizer.decode(pid)):
            kw["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kw))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval 0.4.13 splits a causal LM's request."""
    if context == "":
        cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
        pid = prefix_token_id(tokenizer)
        return ([pid], cont) if not cont or pid != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


# --- scoring ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """One continuation's score."""

    ll: float
    is_greedy: bool
    n_tokens: int


def model_max_length(model: Any, default: int = 2048) -> int:
    """lm-eval's ``max_length``: the config's context length (``n_positions``, ``max_position_embeddings``...)."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _vocab_size(model: Any) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


class Scorer:
    """Scores (context tokens, continuation tokens) requests of questions with a causal LM.

    Two paths with the same results: **packed** (:mod:`.packing`, the default where :func:`packable` allows it):
    each question's choices as one tree sequence, many questions per forward, at most ``max_tokens`` tokens
    (rows x width) each, the LM head only on the rows read; **cached** (every other model, or ``packed=False``):
    one question at a time, its shared prefix once through the K/V cache, then its choices as one right-padded
    batch of at most ``max_rows`` rows.
    """

    def __init__(self, model: Any, tokenizer: Any, max_rows: int = 64, max_tokens: int = 1024,
                 packed: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max(1, max_rows)
        self.max_tokens = max(1, max_tokens)
        self.packed = packable(model) if packed is None else (packed and packable(model))
        self.max_length = model_max_length(model)
        self.vocab = _vocab_size(model)
        params = _forward_params(model)
        self.keep_arg = "logits_to_keep" in params
        # transformers 5.24 names the K/V cache argument `cache` (`past_key_values` before, still accepted)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else \
            torch.device("cpu")
        self.pad = 0

    def encode(self, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Each request's (context, continuation) tokens; a continuation of no token or a token id outside the
        model's vocabulary cannot be scored (:class:`UserError`)."""
        out = []
        for ctx, cont in requests:
            c, t = encode_pair(self.tokenizer, ctx, cont)
            if not c:
                raise UserError(f"the context {ctx!r} encodes to no token", "this request cannot be scored")
            if not t:
                raise UserError(f"the continuation {cont!r} encodes to no token after its context",
                                "this model's tokenizer cannot score this choice")
            if len(t) > self.max_length:
                raise UserError(f"a continuation of {len(t)} tokens exceeds the model's context of "
                                f"{self.max_length}", "use a model with a longer context")
            if self.vocab is not None and max(c + t) >= self.vocab:
                raise UserError(f"the tokenizer gives token id {max(c + t)}, beyond the model's vocabulary of "
                                f"{self.vocab}", "pair the model with its own tokenizer")
            out.append((c, t))
        return out

    def _forward(self, ids: torch.Tensor, past: Any, keep_last: bool) -> tuple[torch.Tensor, Any]:
        kw: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if past is not None:
            kw[self.cache_arg] = past
        if keep_last and self.keep_arg:
            kw["logits_to_keep"] = 1
        out = self.model(**kw)
        logits = out.logits[:, -1:] if keep_last else out.logits
        new = getattr(out, "cache", None)
        return logits.float(), new if new is not None else getattr(out, "past_key_values", None)

    def score_many(self, questions: Sequence[Sequence[tuple[list[int], list[int]]]],
                   on_done: Callable[[int], None] | None = None) -> list[list[Scored]]:
        """Each question's continuations scored (``on_done(k)`` after every ``k`` questions scored)."""
        if not self.packed:
            out = []
            for q in questions:
                out.append(self._score_cached(q))
                if on_done is not None:
                    on_done(1)
            return out
        trees = [build_tree(q, self.max_length) for q in questions]
        scored = score_trees(self.model, trees, self.max_tokens, on_batch=on_done)
        return [[Scored(ll, greedy, len(tg)) for (ll, greedy), tg in zip(res, t.targets, strict=True)]
                for res, t in zip(scored, trees, strict=True)]

    def score(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """Log-likelihood and greediness of each continuation of one question."""
        return self.score_many([encoded])[0]

    @torch.inference_mode()
    def _score_cached(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """One question: its shared prefix once with the K/V cache, then its choices as one padded batch."""
        L = self.max_length
        seqs, ctx_lens = [], []
        for c, t in encoded:
            s = (c + t)[-(L + 1):]
            seqs.append(s)
            ctx_lens.append(len(s) - len(t))
        inputs = [s[:-1] for s in seqs]
        c = min(common_prefix(inputs), min(ctx_lens))
        prefix_logp, past = None, None
        if c > 0:
            logits, past = self._forward(torch.tensor([inputs[0][:c]], device=self.device), None, keep_last=True)
            prefix_logp = F.log_softmax(logits[0, -1], dim=-1)  # predicts the token at position c
        results: list[Scored | None] = [None] * len(seqs)
        rows = [i for i in range(len(seqs)) if len(inputs[i]) > c]
        for i in range(len(seqs)):
            if len(inputs[i]) == c:  # a one-token continuation right after the shared prefix
                tok = seqs[i][-1]
                assert prefix_logp is not None
                results[i] = Scored(float(prefix_logp[tok]), bool(int(prefix_logp.argmax()) == tok), 1)
        for k in range(0, len(rows), self.max_rows):
            chunk = rows[k:k + self.max_rows]
            width = max(len(inputs[i]) - c for i in chunk)
            batch = torch.full((len(chunk), width), self.pad, dtype=torch.long, device=self.device)
            for r, i in enumerate(chunk):
                tail = inputs[i][c:]
                batch[r, :len(tail)] = torch.tensor(tail)
            cache = past
            if past is not None:
                if k + self.max_rows < len(rows):  # later chunks read the prefix again: keep it intact
                    cache = copy.deepcopy(past)
                if len(chunk) > 1:
                    cache.batch_repeat_interleave(len(chunk))
            logits, _ = self._forward(batch, cache, keep_last=False)
            logp = F.log_softmax(logits, dim=-1)  # (rows, width, V)
            for r, i in enumerate(chunk):
                first = ctx_lens[i] - 1  # position predicting the first continuation token
                targets = seqs[i][ctx_lens[i]:]
                parts = []
                if first == c - 1:
                    assert prefix_logp is not None
                    parts.append(prefix_logp[None])
                    lo = 0
                else:
                    lo = first - c
                n_rest = len(targets) - len(parts)
                parts.append(logp[r, lo:lo + n_rest])
                lp = torch.cat(parts, dim=0)  # (len(targets), V)
                tgt = torch.tensor(targets, device=lp.device)
                ll = float(lp.gather(1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                results[i] = Scored(ll, greedy, len(targets))
        return [r for r in results if r is not None]


# --- metrics ------------------------------------------------------------------------------------------------

def argmax_first(values: Sequence[float]) -> int:
    """``np.argmax``: the first index of the largest value."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, Any]:
    """acc, acc_norm (per character), acc_bytes (per UTF-8 byte) and the predictions, for one question."""
    chars = [float(len(c)) for c in choices]
    nbytes = [float(len(c.encode("utf-8"))) for c in choices]
    pred = argmax_first(lls)
    pred_norm = argmax_first([ll / n if n else -math.inf for ll, n in zip(lls, chars, strict=True)])
    pred_bytes = argmax_first([ll / n if n else -math.inf for ll, n in zip(lls, nbytes, strict=True)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
            "acc_bytes": float(pred_bytes == gold)}


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation (n - 1) / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's ``pooled_sample_stderr`` of a size-weighted group mean."""
    var = sum((n - 1) * se**2 * n for n, se in zip(sizes, stderrs, strict=True)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))
