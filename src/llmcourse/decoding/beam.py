"""Beam search with the exact semantics of transformers 5.24 (``GenerationMixin._beam_search``).

Beam search (Graves 2012; Sutskever et al. 2014) keeps the ``K`` best partial hypotheses by
accumulated log-probability ``s(y_1..t) = sum_i log p(y_i | y_<i, x)``. At each step:

1. every running beam ``b`` proposes every token ``v``: ``s_bv = s_b + log softmax(z_b)_v``
   (after the logits processors, e.g. a repetition penalty);
2. the best ``2K`` pairs (``K * max(2, 1 + n_eos)``) are kept, so that even if ``K`` of them end with
   EOS there are ``K`` left to continue;
3. the best ``K`` candidates that did not stop become the next running beams;
4. candidates among the first ``K`` that stop (EOS, or the length limit) compete for the ``K``
   finished slots with the length-normalised score ``s / L^alpha`` (``L`` = generated tokens
   including the EOS, ``alpha`` = ``length_penalty``; Wu et al. 2016 use a variant of this);
5. the search ends when the length limit is hit, when ``early_stopping=True`` and ``K``
   hypotheses are finished, or when no running beam can still beat the worst finished one. That
   last test uses the best running score divided by ``(cur_len - prompt_len)^alpha`` (or, with
   ``early_stopping="never"`` and ``alpha > 0``, by ``(max_len - prompt_len)^alpha``, the exact
   bound) — transformers' heuristic, kept as is so that results are identical.

The arithmetic below (the ``-1e9`` masks, the order of the ``topk`` calls, float32 scores) is
that of transformers, so sequences are identical and scores agree to float rounding; the code
is ours and handles one prompt at a time. A :class:`BeamRecorder` may watch every step (for the
search-tree plots): which candidates were kept, pruned or finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

BIG = 1.0e9


class Decoder(Protocol):
    """What the search needs from a model: see :mod:`llmcourse.decoding.engine`."""

    def start(self, ids: torch.Tensor, rows: int, capacity: int) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def reorder(self, rows: torch.Tensor) -> None: ...


@dataclass
class BeamCandidate:
    """One (beam, token) proposal of one step, as the recorder sees it."""

    parent: int  # index of the running beam it extends
    token: int
    token_logprob: float  # processed log-probability of the token given its beam
    score: float  # accumulated log-probability
    status: str  # "kept" (running next step), "finished" (entered the finished set), "pruned"


@dataclass
class BeamRecorder:
    """Collects, per step, the ``2K`` candidates and where each went."""

    steps: list[list[BeamCandidate]] = field(default_factory=list)
    running_parents: list[list[int]] = field(default_factory=list)  # per step: candidate index of each new beam


@dataclass
class BeamResult:
    """The ``num_return_sequences`` best finished hypotheses, best first."""

    token_ids: list[list[int]]  # generated tokens only (EOS included when it ended the hypothesis)
    scores: list[float]  # length-normalised scores, as transformers' ``sequences_scores``
    steps: int  # decoding steps run


def beam_search(
    decoder: Decoder,
    prompt: list[int],
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    process: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    recorder: BeamRecorder | None = None,
) -> BeamResult:
    """Run beam search from ``prompt``; ``process(ids (K, T), logprobs (K, V))`` applies the logits processors."""
    k = num_beams
    p = len(prompt)
    max_len = p + max_new_tokens
    keep = max(2, 1 + len(eos_token_ids)) * k
    top_k_mask = torch.arange(keep) < k
    eos = torch.tensor(eos_token_ids, dtype=torch.long)
    fill = eos_token_ids[0] if eos_token_ids else -1

    running = torch.full((k, max_len), fill, dtype=torch.long)
    running[:, :p] = torch.tensor(prompt, dtype=torch.long)
    running_scores = torch.zeros(1, k)
    running_scores[:, 1:] = -BIG  # only the first beam proposes at step one: no duplicates
    finished = running.clone()
    finished_len = torch.zeros(k, dtype=torch.long)
    finished_scores = torch.full((1, k), -BIG)
    is_finished = torch.zeros(1, k, dtype=torch.bool)
    can_improve = torch.ones(1, 1, dtype=torch.bool)

    logits = decoder.start(torch.tensor([prompt], dtype=torch.long), k, max_len)  # (K, V)
    cur = p
    steps = 0
    while True:
        steps += 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if process is not None:
            logprobs = process(running[:, :cur], logprobs)
        vocab = logprobs.shape[-1]
        total = (logprobs + running_scores[0, :, None]).reshape(1, -1)  # (1, K*V)

        # 2. the best `keep` (beam, token) pairs over all beams
        cand_scores, cand_flat = torch.topk(total, keep)  # (1, keep)
        cand_beam = cand_flat[0] // vocab
        cand_tok = cand_flat[0] % vocab
        cand_seq = running[cand_beam]  # (keep, max_len), a copy
        cand_seq[:, cur] = cand_tok
        stops = torch.isin(cand_tok, eos) | (cur + 1 >= max_len)  # (keep,)

        # 3. the best K that did not stop keep running
        cand_running = cand_scores + stops[None].to(torch.float32) * -BIG
        nxt = torch.topk(cand_running, k)[1][0]  # (K,)
        running = cand_seq[nxt]
        running_scores = cand_running[:, nxt]
        parents = cand_beam[nxt]

        # 4. stopped candidates among the first K compete for the finished slots
        just_finished = stops & top_k_mask
        normed = cand_scores / ((cur + 1 - p) ** length_penalty)
        full = bool(is_finished.all()) and early_stopping is True
        normed = normed + float(full) * -BIG
        normed = normed + (~can_improve).to(torch.float32) * -BIG
        normed = normed + (~just_finished[None]) * -BIG
        merged_scores = torch.cat((finished_scores, normed), dim=1)
        best = torch.topk(merged_scores, k)[1][0]
        merged_seq = torch.cat((finished, cand_seq), dim=0)
        merged_len = torch.cat((finished_len, torch.full((keep,), cur + 1 - p, dtype=torch.long)))
        merged_fin = torch.cat((is_finished, just_finished[None]), dim=1)
        finished, finished_len = merged_seq[best], merged_len[best]
        finished_scores, is_finished = merged_scores[:, best], merged_fin[:, best]

        if recorder is not None:
            entered = {int(i) - k for i in best if int(i) >= k and bool(merged_fin[0, i])}
            kept = {int(i) for i in nxt if not bool(stops[int(i)])}
            recorder.steps.append([
                BeamCandidate(int(cand_beam[i]), int(cand_tok[i]), float(logprobs[cand_beam[i], cand_tok[i]]),
                              float(cand_scores[0, i]),
                              "finished" if i in entered else "kept" if i in kept else "pruned")
                for i in range(keep)])
            recorder.running_parents.append([int(i) for i in nxt])

        # 5. stop?
        cur += 1
        if bool(stops.all()):
            break
        hyp_len = (max_len - p) if (early_stopping == "never" and length_penalty > 0.0) else (cur - p)
        best_running = running_scores[:, :1] / (hyp_len ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -BIG)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        if not bool(can_improve.any()) or (bool(is_finished.all()) and early_stopping is True):
            break
        decoder.reorder(parents)
        logits = decoder.step(running[:, cur - 1])

    n = num_return_sequences
    return BeamResult(
        token_ids=[finished[i, p:p + int(finished_len[i])].tolist() for i in range(n)],
        scores=[float(s) for s in finished_scores[0, :n]],
        steps=steps,
    )

