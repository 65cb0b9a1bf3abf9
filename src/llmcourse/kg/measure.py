"""The measured comparison: questions generated from the graph, with gold answers, asked in each mode.

Single-hop questions read one edge of a country (capital, continent, currency, language); two-hop
questions go through the capital: "What is the currency of the country whose capital is Lima?" and
"On which continent is the country whose capital is Lima?". Only capitals that name one country are
used, so every question has one gold entity (its name and aliases all count).

Scores: ``exact`` (the normalised answer equals a gold name, after stripping "the" and final
punctuation) and ``contains`` (a gold name appears in the answer as whole words), per mode and
question kind, with the mean seconds per question.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from llmcourse.kg.qa import Asker
from llmcourse.kg.store import GraphStore
from llmcourse.kg.triples import normalize

SINGLE = {
    "capital": "What is the capital of {c}?",
    "continent": "On which continent is {c}?",
    "currency": "What is the currency of {c}?",
    "language": "What language is spoken in {c}?",
}
TWO_HOP = {
    "currency": "What is the currency of the country whose capital is {x}?",
    "continent": "On which continent is the country whose capital is {x}?",
}


@dataclass
class Question:
    question: str
    gold: list[str]  # any of these is right
    kind: str  # "single" | "two-hop"
    relation: str


def make_questions(store: GraphStore, n_single: int = 40, n_two_hop: int = 20, seed: int = 0) -> list[Question]:
    """A deterministic question set from the graph's country edges (balanced over the relations)."""
    ents = {e.id: e for e in store.entities()}
    out_edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    capital_of: dict[str, list[str]] = defaultdict(list)
    for t in store.triples():
        if t.subject_type != "Country":
            continue
        out_edges[t.subject][t.relation].append(t.object)
        if t.relation == "capital":
            capital_of[t.object].append(t.subject)

    def gold(name: str) -> list[str]:
        e = ents.get(normalize(name))
        return [name, *(e.aliases if e else [])]

    rng = random.Random(seed)
    countries = sorted(c for c in out_edges if all(r in out_edges[c] for r in SINGLE))
    rng.shuffle(countries)
    qs: list[Question] = []
    rels = list(SINGLE)
    for i, c in enumerate(countries[:n_single]):
        rel = rels[i % len(rels)]
        golds = [g for o in out_edges[c][rel] for g in gold(o)]
        qs.append(Question(SINGLE[rel].format(c=c), golds, "single", rel))
    caps = sorted(x for x, cs in capital_of.items() if len(cs) == 1 and normalize(x) != normalize(cs[0]))
    rng.shuffle(caps)
    rels2 = list(TWO_HOP)
    for i, x in enumerate(caps[:n_two_hop]):
        rel = rels2[i % len(rels2)]
        c = capital_of[x][0]
        if rel not in out_edges[c]:
            continue
        golds = [g for o in out_edges[c][rel] for g in gold(o)]
        qs.append(Question(TWO_HOP[rel].format(x=x), golds, "two-hop", rel))
    return qs


def _clean(text: str) -> str:
    t = normalize(text)
    t = re.sub(r"^(the|a|an)\s+", "", t)
    return t.strip(" .!")


def exact_match(answer: str, gold: list[str]) -> bool:
    a = _clean(answer)
    return any(a == _clean(g) for g in gold)


def _padded_words(text: str) -> str:
    return " " + " ".join(re.findall(r"[\w-]+", normalize(text))) + " "


def contains(answer: str, gold: list[str]) -> bool:
    a = _padded_words(answer)
    return any(_padded_words(g) in a for g in gold if len(g) > 1)


def evaluate(asker: Asker, questions: list[Question], modes: tuple[str, ...] = ("none", "vector", "facts"),
             hops: int = 2, on_item: Callable[[], None] | None = None) -> dict[str, Any]:
    """Ask every question in every mode; return per-mode, per-kind accuracy and the answers."""
    rows, table = [], []
    for mode in modes:
        for q in questions:
            a = asker.ask(q.question, mode=mode, hops=hops)
            rows.append({**asdict(q), "mode": mode, "answer": a.answer, "exact": exact_match(a.answer, q.gold),
                         "contains": contains(a.answer, q.gold), "seconds": a.seconds,
                         "facts": [f.text for f in a.facts], "cypher": a.cypher})
            if on_item:
                on_item()
    for mode in modes:
        for kind in ("single", "two-hop"):
            rs = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
            if rs:
                table.append({"mode": mode, "kind": kind, "questions": len(rs),
                              "exact": sum(r["exact"] for r in rs) / len(rs),
                              "contains": sum(r["contains"] for r in rs) / len(rs),
                              "seconds_per_question": sum(r["seconds"] for r in rs) / len(rs)})
    return {"table": table, "answers": rows}
