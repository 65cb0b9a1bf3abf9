"""The measured comparison: questions generated from the graph, with gold answers, asked in each mode.

Single-hop questions read one edge of a country (capital, continent, currency, language); two-hop
questions go through the capital: "What is the currency of the country whose capital is Lima?" and
"On which continent is the country whose capital is Lima?" (and the language). Only capitals that
name one country are used, so every question has one gold entity (its name and aliases all count).
Unanswerable questions have no gold: a place the graph does not hold ("What is the capital of
Atlantis?") or a relation it does not hold ("Who is the president of France?"); the right reply is
"I don't know".

Scores: ``exact`` (the normalised answer equals a gold name, after stripping "the" and final
punctuation) and ``contains`` (a gold name appears in the answer as whole words), per mode and
question kind, with the mean seconds per question; and abstention per mode: precision (of the
answers that said "I don't know", the share whose question was unanswerable) and recall (of the
unanswerable questions, the share answered "I don't know").
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
    "language": "What language is spoken in the country whose capital is {x}?",
}
# places no geographic graph holds, asked with the single-hop templates
FICTIONAL = ("Atlantis", "Narnia", "Wakanda", "Westeros", "Lilliput", "Gondor", "Mordor", "Genovia", "Latveria",
             "Elbonia", "Freedonia", "Ruritania")
# relations the countries graph does not hold, asked of real countries
NOT_IN_GRAPH = ("Who is the president of {c}?", "What is the national anthem of {c}?",
                "What is the highest mountain in {c}?", "What is the national dish of {c}?")


@dataclass
class Question:
    question: str
    gold: list[str]  # any of these is right (none: the question is unanswerable from the graph)
    kind: str  # "single" | "two-hop" | "unanswerable"
    relation: str


def make_questions(store: GraphStore, n_single: int = 40, n_two_hop: int = 20, seed: int = 0,
                   n_unanswerable: int = 0) -> list[Question]:
    """A deterministic question set from the graph's country edges (balanced over the relations), with
    ``n_unanswerable`` questions (half about fictional places, half about relations the graph lacks)."""
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
    places = [p for p in FICTIONAL if normalize(p) not in ents]
    for i in range(n_unanswerable):
        if i % 2 == 0 and places:
            rel = rels[(i // 2) % len(rels)]
            qs.append(Question(SINGLE[rel].format(c=places[(i // 2) % len(places)]), [], "unanswerable",
                               "unknown place"))
        elif countries:
            template = NOT_IN_GRAPH[(i // 2) % len(NOT_IN_GRAPH)]
            qs.append(Question(template.format(c=countries[-1 - i // 2]), [], "unanswerable", "unknown relation"))
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
                         "contains": contains(a.answer, q.gold), "abstained": a.abstained,
                         "supported": a.supported, "seconds": a.seconds,
                         "facts": [f.text for f in a.facts], "cypher": a.cypher})
            if on_item:
                on_item()
    abstention = []
    for mode in modes:
        for kind in ("single", "two-hop", "unanswerable"):
            rs = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
            if rs:
                table.append({"mode": mode, "kind": kind, "questions": len(rs),
                              "exact": sum(r["exact"] for r in rs) / len(rs),
                              "contains": sum(r["contains"] for r in rs) / len(rs),
                              "abstained": sum(r["abstained"] for r in rs) / len(rs),
                              "seconds_per_question": sum(r["seconds"] for r in rs) / len(rs)})
        rs = [r for r in rows if r["mode"] == mode]
        said = [r for r in rs if r["abstained"]]
        should = [r for r in rs if r["kind"] == "unanswerable"]
        right = [r for r in said if r["kind"] == "unanswerable"]
        abstention.append({"mode": mode, "abstained": len(said), "unanswerable": len(should),
                           "precision": len(right) / len(said) if said else None,
                           "recall": len(right) / len(should) if should else None})
    return {"table": table, "abstention": abstention, "answers": rows}
