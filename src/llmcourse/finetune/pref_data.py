"""Preference data: TRL's JSONL formats -> token ids of (prompt, chosen, rejected), pairs batched with a shared
prompt, and the default on-policy pairs built from the country facts without annotators.

**Formats** (TRL's, one JSON object per line):

* standard: ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` — plain text; the tokenizer's EOS is
  appended to chosen and rejected when missing (as TRL does);
* conversational: ``{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}`` — the chat template is applied as TRL's ``DPOTrainer`` applies it: the prompt with
  the generation prompt, prompt + chosen and prompt + rejected without it; the completion starts where
  the token ids of the prompt and of prompt + completion diverge (TRL's ``common_prefix_length``);
* implicit prompt: ``{"chosen": ..., "rejected": ...}`` only (text or messages): the prompt is their longest
  common prefix (TRL's ``extract_prompt``).

**Batching**: the B pairs of a micro-batch are laid end to end in one row, each pair as
``prompt, chosen, rejected``: the rejected tokens take the positions that follow the prompt (as if the
chosen tokens were not there) and attend to the prompt and to themselves only (a block causal mask), so
the prompt is computed once per pair and no pad token is computed. The log-probability of each completion
token ``y_t`` is read where it is predicted: the last prompt token predicts the first token of both chosen
and rejected. Chosen and rejected of one prompt are always in the same micro-batch.

**Default pairs** (:func:`build_default_pairs`): for each training country of the SFT facts (the held-out
countries stay out) and each question (capital, continent, currency), ``chosen`` is the true answer
("The capital of Peru is Lima.") and ``rejected`` an answer sampled from the model itself whose text does
not contain the true fact (on-policy pairs, checked against the facts; no annotator). A question whose
samples are all right gives no pair. ``llmcourse preference-pairs --model M --out pairs.jsonl`` rebuilds the
set from any model; ``finetune --method dpo --data default`` builds it from ``--model`` at the start.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.data import jsonl_file, jsonl_objects
from llmcourse.core.errors import UserError
from llmcourse.finetune.sft_data import capital_question, default_split, normalize

log = logging.getLogger(__name__)

FIX = ('each line needs "prompt", "chosen" and "rejected" (strings, or lists of {"role", "content"} messages), '
       'or "chosen" and "rejected" sharing the prompt')


@dataclass
class PreferenceExample:
    """One pair as read: text (standard) or message lists (conversational)."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class PairRow:
    """One tokenized pair; ``ref_*`` are the reference log-probabilities when precomputed."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None


# ---------------------------------------------------------------- reading


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): the longest common prefix of ``chosen`` and ``rejected`` (characters or
    messages) as the prompt, as TRL's ``extract_prompt``."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def parse_pair(obj: Any, where: str) -> PreferenceExample:
    """One JSONL object as a pair; a missing or empty field, or chosen == rejected, names ``where``."""
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a JSON object", FIX)
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise UserError(f"{where} has no {' or '.join(repr(k) for k in missing)} field", FIX)
    chosen, rejected = obj["chosen"], obj["rejected"]
    kinds = {_is_messages(chosen), _is_messages(rejected)}
    if kinds == {True}:
        pass
    elif all(isinstance(v, str) for v in (chosen, rejected)):
        pass
    else:
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of "
                        "{role, content} messages", FIX)
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(chosen, list) and not (_is_messages(prompt) or prompt == []):
            raise UserError(f"{where}: 'prompt' must be a list of messages like 'chosen'", FIX)
        if isinstance(chosen, str) and not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' must be a string like 'chosen'", FIX)
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' equals 'rejected' (no preference to learn)",
                        "drop that pair or fix its rejected answer")
    empty_prompt = (not prompt or not prompt.strip()) if isinstance(prompt, str) else (
        not prompt or all(not m["content"].strip() for m in prompt))
    if empty_prompt:
        raise UserError(f"{where}: the prompt is empty", "give every pair a prompt (the question it answers)")
    for k, v in (("chosen", chosen), ("rejected", rejected)):
        if (not v) if isinstance(v, list) else not v.strip():
            raise UserError(f"{where}: '{k}' is empty", FIX)
    return PreferenceExample(prompt, chosen, rejected)


def read_pairs(path: str | Path) -> list[PreferenceExample]:
    """The pairs of a ``.jsonl`` file (TRL's formats, see the module docstring)."""
    path = jsonl_file(path, "prompt/chosen/rejected")
    out = [parse_pair(obj, where) for where, obj in jsonl_objects(path)]
    if not out:
        raise UserError(f"{path} has no pairs", "add lines with prompt/chosen/rejected")
    return out


def split_pairs(pairs: list[PreferenceExample], eval_fraction: float = 0.1, seed: int = 0
                ) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, eval): a seeded ``eval_fraction`` held out (none under 10 pairs), as the SFT data."""
    n_eval = int(len(pairs) * eval_fraction) if len(pairs) >= 10 else 0
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ---------------------------------------------------------------- tokenizing (as TRL's DPOTrainer)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, v: Any, add_generation_prompt: bool = False) -> list[int]:
    if isinstance(v, list):
        return list(tokenizer.apply_chat_template(v, tokenize=True, return_dict=True,
                                                  add_generation_prompt=add_generation_prompt)["input_ids"])
    return list(tokenizer(text=v)["input_ids"])


def tokenize_pair(tokenizer: Any, ex: PreferenceExample, max_len: int) -> PairRow | None:
    """Token ids of prompt, chosen and rejected (TRL's tokenization), each sequence truncated to ``max_len``
    (keep the start); None when the prompt alone fills ``max_len`` (nothing left to learn)."""
    if ex.conversational:
        prompt_ids = _ids(tokenizer, ex.prompt, add_generation_prompt=True)
        pc = _ids(tokenizer, ex.prompt + ex.chosen)
        pr = _ids(tokenizer, ex.prompt + ex.rejected)
    else:
        eos = tokenizer.eos_token or ""
        chosen = ex.chosen if ex.chosen.endswith(eos) else ex.chosen + eos
        rejected = ex.rejected if ex.rejected.endswith(eos) else ex.rejected + eos
        prompt_ids = _ids(tokenizer, ex.prompt)
        pc, pr = _ids(tokenizer, ex.prompt + chosen), _ids(tokenizer, ex.prompt + rejected)
    n = min(_common_prefix(prompt_ids, pc), _common_prefix(prompt_ids, pr))
    if n == 0 or n >= max_len:
        return None
    return PairRow(prompt_ids[:n], pc[n:max_len], pr[n:max_len])


def tokenize_pairs(tokenizer: Any, pairs: list[PreferenceExample], max_len: int) -> list[PairRow]:
    """Every pair that keeps a completion token after truncation; a pair whose chosen and rejected token ids
    are equal is refused (they differ only in a way the tokenizer drops)."""
    rows = []
    for i, ex in enumerate(pairs):
        r = tokenize_pair(tokenizer, ex, max_len)
        if r is None:
            continue
        if not r.chosen_ids or not r.rejected_ids:
            continue
        if r.chosen_ids == r.rejected_ids:
            raise UserError(f"pair {i + 1}: chosen and rejected have the same tokens within --seq-len {max_len}",
                            "raise --seq-len or drop that pair")
        rows.append(r)
    return rows


# ---------------------------------------------------------------- batching


def collate_pairs(rows: list[PairRow]) -> dict[str, torch.Tensor]:
    """One padding-free row holding the B pairs (see the module docstring).

    Returns ``input_ids``, ``position_ids`` (1, T); ``attention_mask`` (1, 1, T, T) boolean; ``source`` (N,)
    the positions whose next-token distribution scores a completion token, ``target`` (N,) that token,
    ``sequence`` (N,) its sequence (pair k: chosen k, rejected B + k); ``lengths`` (2B,) completion lengths;
    ``ref_logps`` (2B,) when every row carries precomputed reference log-probabilities."""
    B = len(rows)
    ids: list[int] = []
    pos: list[int] = []
    group: list[int] = []  # pair index + 1
    part: list[int] = []  # 0 prompt, 1 chosen, 2 rejected
    source: list[int] = []
    target: list[int] = []
    sequence: list[int] = []
    for k, r in enumerate(rows):
        P = len(r.prompt_ids)
        start = len(ids)
        ids += r.prompt_ids
        pos += list(range(P))
        group += [k + 1] * P
        part += [0] * P
        for which, comp in ((1, r.chosen_ids), (2, r.rejected_ids)):
            off = len(ids)
            ids += comp
            pos += list(range(P, P + len(comp)))
            group += [k + 1] * len(comp)
            part += [which] * len(comp)
            # token t of the completion is predicted at the previous token: the prompt's last for t = 0
            source += [start + P - 1] + [off + t - 1 for t in range(1, len(comp))]
            target += comp
            sequence += [k if which == 1 else B + k] * len(comp)
    T = len(ids)
    g, pt = torch.tensor(group), torch.tensor(part)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_pair = g[:, None] == g[None, :]
    sees_part = (pt[None, :] == 0) | (pt[:, None] == pt[None, :])  # the prompt, or its own completion
    mask = causal & same_pair & sees_part
    out = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "attention_mask": mask[None, None],
           "source": torch.tensor(source), "target": torch.tensor(target), "sequence": torch.tensor(sequence),
           "lengths": torch.tensor([len(r.chosen_ids) for r in rows] + [len(r.rejected_ids) for r in rows],
                                   dtype=torch.float32)}
    if all(r.ref_chosen is not None and r.ref_rejected is not None for r in rows):
        out["ref_logps"] = torch.tensor([r.ref_chosen for r in rows] + [r.ref_rejected for r in rows],
                                        dtype=torch.float32)
    return out


def pair_tokens(rows: list[PairRow]) -> int:
    """Tokens computed for ``rows`` (prompt once per pair)."""
    return sum(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)


# ---------------------------------------------------------------- default on-policy pairs


def country_questions(c: dict[str, str]) -> list[tuple[str, str, str]]:
    """(question, true answer, the fact the answer must contain) for one country."""
    out = [(capital_question(c["name"]), f"The capital of {c['name']} is {c['capital']}.", c["capital"])]
    if c["continent"]:
        out.append((f"On which continent is {c['name']}?", f"{c['name']} is in {c['continent']}.", c["continent"]))
    if c["currency"]:
        out.append((f"What is the currency of {c['name']}?", f"The currency of {c['name']} is the {c['currency']}.",
                    c["currency"]))
    return out


def is_correct(answer: str, fact: str) -> bool:
    """An answer is right when it contains the fact (case and accents ignored)."""
    return normalize(fact) in normalize(answer)


@torch.no_grad()
def sample_answers(model: Any, tokenizer: Any, questions: list[str], samples: int, max_new_tokens: int = 32,
                   temperature: float = 1.0, batch: int = 32, seed: int = 0, show_progress: bool = False
                   ) -> list[list[str]]:
    """``samples`` answers per question, sampled from ``model`` (chat template, temperature, top-k off)."""
    from llmcourse.core.progress import progress

    torch.manual_seed(seed)
    was = model.training
    model.eval()
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
               for q in questions]
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    answers: list[list[str]] = [[] for _ in questions]
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = progress(total=len(jobs), desc="sampling answers", unit="answer") if show_progress else None
    for s in range(0, len(jobs), batch):
        chunk = jobs[s:s + batch]
        L = max(len(p) for _, p in chunk)
        ids = torch.full((len(chunk), L), pid, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, (_, p) in enumerate(chunk):  # left padding
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pid)
        for b, (i, _) in enumerate(chunk):
            answers[i].append(tokenizer.decode(out[b, L:], skip_special_tokens=True).strip())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was)
    return answers


def build_default_pairs(model: Any, tokenizer: Any, samples: int = 2, seed: int = 0,
                        countries: list[dict[str, str]] | None = None, show_progress: bool = False,
                        max_new_tokens: int = 32) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pairs as TRL conversational JSONL objects, statistics): see the module docstring. ``countries``
    defaults to the SFT training countries (the held-out ones never appear)."""
    countries = countries if countries is not None else default_split()[0]
    items = [(c, q, a, fact) for c in countries for q, a, fact in country_questions(c)]
    answers = sample_answers(model, tokenizer, [q for _, q, _, _ in items], samples, max_new_tokens, seed=seed,
                             show_progress=show_progress)
    pairs, right, empty = [], 0, 0
    for (c, q, a, fact), got in zip(items, answers, strict=True):
        wrong = []
        for ans in got:
            if not ans:
                empty += 1
            elif is_correct(ans, fact):
                right += 1
            elif ans not in wrong:
                wrong.append(ans)
        if wrong:
            pairs.append({"prompt": [{"role": "user", "content": q}],
                          "chosen": [{"role": "assistant", "content": a}],
                          "rejected": [{"role": "assistant", "content": wrong[0]}],
                          "country": c["name"]})
    n = sum(len(g) for g in answers)
    stats = {"questions": len(items), "samples": n, "sampled_right": right, "sampled_empty": empty,
             "pairs": len(pairs), "countries": len(countries)}
    return pairs, stats


def write_pairs(path: str | Path, pairs: list[dict[str, Any]]) -> None:
    """Pairs as JSONL (atomically)."""
    from llmcourse.core.io import atomic_file

    with atomic_file(Path(path), "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
