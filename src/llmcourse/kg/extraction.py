"""Triples from text: a few-shot prompt, the model's reply, and the strict parser (:func:`parse_extraction`).

As in the notebook (LangChain's knowledge-triple prompt), the model is shown examples of sentences and
their ``subject | relation | object`` lines (as earlier chat turns) and asked for the next sentence's. Whatever it writes,
:func:`llmcourse.kg.triples.parse_extraction` keeps the well-formed lines and counts the rest:
bad model output never crashes a build. :func:`precision` scores an extraction against gold triples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmcourse.kg.qa import LLM
from llmcourse.kg.triples import Triple, normalize, normalize_relation, parse_extraction

INSTRUCTION = "Extract the facts of the sentence as lines: subject | relation | object"
# worked examples, given as earlier chat turns: a 135M chat model follows turns far better than
# examples pasted into one message (it then copies the examples' entities)
SHOTS = [
    ("Paris is the capital of France.", "France | capital | Paris"),
    ("Google was founded by Larry Page in 1998.", "Google | founded_by | Larry Page\nGoogle | founded_in | 1998"),
    ("Sony released the PlayStation in 1994.", "Sony | released | PlayStation\nPlayStation | released_in | 1994"),
]


def few_shot_messages(sentence: str) -> list[dict[str, str]]:
    """The chat messages that ask for ``sentence``'s triples after three worked examples."""
    msgs = [{"role": "system", "content": INSTRUCTION}]
    for q, a in SHOTS:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*msgs, {"role": "user", "content": sentence}]


@dataclass
class TextExtraction:
    """Triples from many sentences, with every rejected line and the raw replies."""

    triples: list[Triple] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)


def sentences(text: str) -> list[str]:
    """Split text into sentences (on . ! ? followed by space, and on newlines)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def extract(text: str, llm: LLM) -> TextExtraction:
    """Ask ``llm`` for the triples of each sentence of ``text``; parse each reply strictly."""
    out = TextExtraction()
    for s in sentences(text):
        reply = llm(few_shot_messages(s))
        ex = parse_extraction(reply, source="llm")
        out.triples += ex.triples
        out.rejected += ex.rejected
        out.replies.append(reply)
    return out


def _key(t: Triple) -> tuple[str, str, str]:
    return normalize(t.subject), normalize_relation(t.relation), normalize(t.object)


def precision(predicted: list[Triple], gold: list[Triple], relaxed: bool = True) -> float:
    """Share of predicted triples that are in ``gold`` (``relaxed``: subject and object match, any relation)."""
    if not predicted:
        return 0.0
    keys = {_key(g) for g in gold}
    pairs = {(k[0], k[2]) for k in keys}
    hit = sum(((_key(p)[0], _key(p)[2]) in pairs) if relaxed else (_key(p) in keys) for p in predicted)
    return hit / len(predicted)
