"""Question answering over a knowledge graph, with provenance: link entities, retrieve, rank, prompt, answer.

The notebook's LangChain ``GraphQAChain`` takes the depth-1 *outgoing* facts of the entities an LLM
names in the question, one relation per node pair. Here (Edge et al. 2024, "From Local to Global:
A Graph RAG Approach", and Pan et al. 2024, "Unifying LLMs and KGs", for the pattern):

1. **link** (:meth:`Asker.link`): the longest word n-grams of the question equal to an entity's
   normalised name or alias (short ISO-code aliases must match case-sensitively); if none match,
   the n-gram whose all-MiniLM embedding is closest to an entity name's (cosine >= ``link_threshold``).
2. **retrieve** (:func:`llmcourse.kg.store.neighbourhood`): every edge within ``hops`` of the linked
   entities, in both directions, multi-edges kept, through parameterised queries.
3. **rank** (:func:`rank_facts`): a path score. A linked entity has reach 3; an edge reached at hop
   ``h`` through node ``v`` scores ``reach(v) + 3 * [its relation is named in the question]``, plus 1
   if it continues a path of named relations with a different one and the question links one entity
   (else minus ``h - 1``), plus 2 if
   it joins two linked entities and 0.1 per question word it repeats; its far end gets reach
   ``score - 3``. So "continent of the country whose capital is Lima" ranks Peru-continent-South
   America, then Lima-capital-Peru, and "continent of Peru" does not pull in every other country of
   South America. The top facts that score within ``margin`` of the best and fit ``max_facts`` and a
   token budget go in the prompt (a 135M model is distracted by every extra fact).
4. **answer**: the facts as sentences, then the question; the result lists the facts shown and
   marks those the answer repeats (``used``).
5. **check** (the answer admits ignorance): no entity linked -> "I don't know: no fact about Atlantis
   in the graph", without generating; the question names a relation no retrieved fact has ("Who is
   the president of France?" against capital/currency/neighbour facts) -> the same, naming it; the top
   fact continues a path of question-named relations (Lima -capital- Peru -currency-> Sol) -> the
   answer is that last hop's far end, read from the graph, not generated; otherwise the model answers
   and the answer is ``supported`` only if it repeats the far end of a fact it was given (accents and
   case folded) — an unsupported reply is replaced by "I don't know: ..." and kept in ``generated``.

Other modes, for the measured comparison: ``none`` (the question alone), ``vector`` (top-k fact
sentences from a FAISS index: plain vector RAG over the same facts) and ``cypher`` (the model writes
a Cypher query, GraphCypherQAChain's approach; it runs only if :func:`check_read_query` passes, on a
read-only database).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llmcourse.core.errors import UserError
from llmcourse.kg.store import CYPHER_SCHEMA, GraphStore, check_read_query, neighbourhood
from llmcourse.kg.triples import Entity, Triple, normalize

LLM = Callable[[str | list[dict[str, str]]], str]  # a user message (or chat messages) -> the model's reply
MODES = ("facts", "vector", "none", "cypher")

TEMPLATES = {
    "capital": "The capital of {s} is {o}.",
    "continent": "The continent of {s} is {o}.",
    "currency": "The currency of {s} is the {o}.",
    "language": "A language of {s} is {o}.",
    "neighbour": "{s} borders {o}.",
}
# words in a question that name a relation besides the relation's own words
SYNONYMS = {"language": ("speak", "spoken"), "neighbour": ("border", "neighbor"), "currency": ("money",),
            "founded_by": ("founder",), "ceo": ("chief", "boss", "runs", "leads")}
# words of a relation that a question may say with another verb ("released_in" for "When did ... announce")
WORD_SYNONYMS = {w: ("announce", "release", "launch", "introduce", "unveil", "present")
                 for w in ("announced", "released", "launched", "introduced", "unveiled", "presented")}
STOPWORDS = set("a an the of in on at to is was are be by for with and or what which who whom whose when where "
                "how did does do that this it its as from".split())
# question words that name neither an entity nor a relation ("Tell me about France")
FILLER = set("tell me about please you can could know give list name say your there".split())


def sentence(t: Triple) -> str:
    """A fact as an English sentence (templates for the country relations)."""
    if t.relation in TEMPLATES:
        return TEMPLATES[t.relation].format(s=t.subject, o=t.object)
    return f"{t.subject} {t.relation.replace('_', ' ')} {t.object}."


def words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", normalize(text))


def _stem(w: str) -> str:
    return w[:5]


def fold(text: str) -> str:
    """``normalize`` without accents ("San José" -> "san jose"), for checking an answer against facts."""
    decomposed = unicodedata.normalize("NFKD", normalize(text))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _padded(text: str) -> str:
    """`` word word `` of ``text``, folded: whole-word containment is a substring test on two of these."""
    return f" {' '.join(words(fold(text)))} "


def dont_know(about: str) -> str:
    """The abstention every mode gives: ``I don't know: no fact about <about> in the graph``."""
    return f"I don't know: no fact about {about} in the graph"


@dataclass
class Fact:
    """A fact in an answer's context, with its score, hop and whether the answer repeats it."""

    subject: str
    relation: str
    object: str
    text: str
    hop: int = 0
    score: float = 0.0
    used: bool = False
    via: str = ""  # the node this edge was reached through (normalised)
    path: list[str] = field(default_factory=list)  # a bridge's earlier hops (their texts), when it continues one


@dataclass
class Answer:
    """What ``ask`` returns: the answer, the facts it was given (provenance), and how it got there."""

    question: str
    answer: str
    mode: str
    facts: list[Fact] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    cypher: str | None = None
    error: str | None = None
    seconds: float = 0.0
    supported: bool = False  # the answer repeats a fact it was given (or is a path's last hop)
    abstained: bool = False  # the answer is "I don't know: ..." (no entity, no fact on the relation, unsupported)
    generated: str | None = None  # the model's own reply (None when no model was asked)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def relation_named(relation: str, question_words: set[str]) -> bool:
    """Whether the question names ``relation`` (one of its words or synonyms, by 5-letter prefix)."""
    parts = [w for w in relation.split("_") if w not in STOPWORDS]
    cues = parts + list(SYNONYMS.get(relation, ())) + [x for w in parts for x in WORD_SYNONYMS.get(w, ())]
    return any(_stem(c) in question_words for c in cues)


def rank_facts(found: list[tuple[Triple, int]], linked: list[str], question: str) -> list[Fact]:
    """Score each retrieved edge by its path from the linked entities (see the module docstring)."""
    qwords = {_stem(w) for w in words(question) if w not in STOPWORDS}
    reach = {e: 3.0 for e in linked}
    came_by: dict[str, str] = {}  # node -> the question-named relation of the edge that reached it
    came_from: dict[str, Fact] = {}  # node -> that edge
    linked_set = set(linked)
    facts = []
    for t, hop in found:  # neighbourhood returns edges hop by hop, so reach is set before it is read
        s, o = normalize(t.subject), normalize(t.object)
        via_node = s if reach.get(s, float("-inf")) >= reach.get(o, float("-inf")) else o
        via = reach.get(via_node, 0.0)
        named = relation_named(t.relation, qwords)
        # a path that repeats its relation (France -continent-> Europe <-continent- Spain) does not
        # answer a second part of the question; one that changes relation (Lima -capital- Peru
        # -currency-> Sol) does
        if named and came_by.get(via_node) == t.relation:
            named = False
        # a bridge only when one entity is linked: with several, the facts between them come first
        chained = named and via_node in came_by and len(linked_set) == 1
        score = via + 3.0 * named + (1.0 if chained else -(hop - 1))
        if s in linked_set and o in linked_set:
            score += 2.0
        text = sentence(t)
        score += 0.1 * len({_stem(w) for w in words(text) if w not in STOPWORDS} & qwords)
        far = o if via_node == s else s
        fact = Fact(t.subject, t.relation, t.object, text, hop, round(score, 3), via=via_node)
        if chained:
            before = came_from[via_node]
            fact.path = [*before.path, before.text]
        if far not in linked_set and score - 3.0 > reach.get(far, float("-inf")):
            reach[far] = score - 3.0
            if named:
                came_by[far] = t.relation
                came_from[far] = fact
        facts.append(fact)
    facts.sort(key=lambda f: (-f.score, f.hop))
    return facts


def answer_prompt(question: str, facts: list[str]) -> str:
    if not facts:
        return f"Answer the question in a few words.\nQuestion: {question}"
    listed = "\n".join(f"- {f}" for f in facts)
    return (f"Answer the question using these facts. Reply with the answer only, in a few words.\n"
            f"Facts:\n{listed}\nQuestion: {question}")


CYPHER_PROMPT = """Write one Cypher query that answers the question. Schema: {schema}.
Example: Question: What is the capital of France?
MATCH (a:Entity {{id: 'france'}})-[r:REL {{relation: 'capital'}}]->(b:Entity) RETURN b.name
Relations: {relations}.
Question: {question}"""


def extract_cypher(text: str) -> str:
    """The query in a model's reply: a fenced block, else from the first MATCH to the end of that line."""
    m = re.search(r"```(?:cypher)?\s*(.+?)```", text, re.DOTALL | re.IGNORECASE)
    if m:
        return m.group(1).strip()
    m = re.search(r"\b(OPTIONAL\s+MATCH|MATCH)\b.*", text, re.IGNORECASE)
    return m.group(0).strip() if m else text.strip()


class Asker:
    """Answers questions from one graph with one LLM; the entity index and vector index are built once."""

    def __init__(self, store: GraphStore, llm: LLM, embedder: Any = None, max_facts: int = 5,
                 fact_tokens: int = 200, link_threshold: float = 0.75, vector_k: int = 5,
                 cypher_llm: LLM | None = None, fuzzy: bool = True, margin: float = 2.5) -> None:
        self.store, self.llm, self._embedder = store, llm, embedder
        self.cypher_llm = cypher_llm or llm  # writing a query takes more tokens than an answer
        self.fuzzy = fuzzy  # embedding similarity when no name matches exactly
        self.margin = margin  # facts scoring more than this below the best are left out
        self.max_facts, self.fact_tokens, self.link_threshold, self.vector_k = (
            max_facts, fact_tokens, link_threshold, vector_k)
        self.entities: dict[str, Entity] = {e.id: e for e in store.entities()}
        self.surface: dict[str, str] = {}  # normalised name or long alias -> entity id
        self.codes: dict[str, str] = {}  # short alias (ISO code), matched case-sensitively -> entity id
        for e in self.entities.values():
            for a in e.aliases:
                (self.codes if len(a) <= 3 else self.surface).setdefault(a if len(a) <= 3 else normalize(a), e.id)
        for e in self.entities.values():  # names win over aliases
            self.surface[e.id] = e.id
        self.longest = max((len(k.split()) for k in self.surface), default=1)
        self._names_index: Any = None
        self._vector: Any = None

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from llmcourse.kg.vector import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    # -- 1. entity linking --------------------------------------------------------------------------
    def link(self, question: str) -> list[str]:
        """Entity ids named in ``question``, longest match first, left to right."""
        toks = words(question)
        raw = re.findall(r"[\w'-]+", question)
        found, i = [], 0
        while i < len(toks):
            for n in range(min(self.longest, len(toks) - i), 0, -1):
                key = " ".join(toks[i:i + n])
                if key in self.surface and not (n == 1 and key in STOPWORDS):
                    found.append(self.surface[key])
                    i += n
                    break
            else:
                i += 1
        found += [self.codes[w] for w in raw if w.isupper() and w in self.codes]
        found = list(dict.fromkeys(found))
        if not found and self.fuzzy and self.entities:
            found = self._link_by_embedding(toks)
        return found

    def _link_by_embedding(self, toks: list[str]) -> list[str]:
        from llmcourse.kg.vector import VectorIndex

        if self._names_index is None:
            ids = list(self.entities)
            self._names_index = (ids, VectorIndex([self.entities[i].name for i in ids], self.embedder))
        ids, index = self._names_index
        grams = [" ".join(toks[i:i + n]) for n in (1, 2, 3) for i in range(len(toks) - n + 1)
                 if not all(w in STOPWORDS for w in toks[i:i + n])]
        best: tuple[float, str] | None = None
        for hits in index.search_many(grams, 1):
            for name, score in hits:
                if score >= self.link_threshold and (best is None or score > best[0]):
                    best = (score, normalize(name))
        return [best[1]] if best and best[1] in self.entities else []

    # -- 2-3. retrieval and ranking -------------------------------------------------------------------
    def retrieve(self, question: str, hops: int = 2) -> tuple[list[str], list[Fact]]:
        """The linked entities and the top facts around them (capped to ``max_facts`` and the token budget)."""
        linked = self.link(question)
        facts = rank_facts(neighbourhood(self.store, linked, hops), linked, question)
        kept, budget = [], self.fact_tokens
        best = facts[0].score if facts else 0.0
        for f in [f for f in facts if f.score >= best - self.margin][:self.max_facts]:
            cost = len(f.text) // 4 + 2  # about 4 characters a token, plus the list marker
            if cost > budget:
                break
            kept.append(f)
            budget -= cost
        return linked, kept

    def vector_facts(self, question: str) -> list[Fact]:
        from llmcourse.kg.vector import VectorIndex

        if self._vector is None:
            ts = self.store.triples()
            self._vector = (ts, VectorIndex([sentence(t) for t in ts], self.embedder))
        ts, index = self._vector
        by_text = {sentence(t): t for t in ts}
        return [Fact(by_text[s].subject, by_text[s].relation, by_text[s].object, s, 0, round(score, 4))
                for s, score in index.search(question, self.vector_k)]

    # -- 4. answering ---------------------------------------------------------------------------------
    def ask(self, question: str, mode: str = "facts", hops: int = 2) -> Answer:
        """Answer ``question`` in ``mode`` (facts | vector | none | cypher), checked against its facts."""
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
        if not question.strip():
            raise UserError("the question is empty", "pass a question")
        t0 = time.perf_counter()
        out = Answer(question, "", mode)
        if mode == "facts":
            out.entities, out.facts = self.retrieve(question, hops)
            missing = self.missing(question, out.entities, out.facts)
            if missing is not None:  # nothing to answer from: say so without generating
                out.answer, out.abstained = dont_know(missing), True
                out.seconds = time.perf_counter() - t0
                return out
            if out.facts and out.facts[0].path:  # a bridge: the path's last hop holds the answer
                top = out.facts[0]
                last = [f for f in out.facts if f.path and f.relation == top.relation and f.via == top.via]
                for f in last:  # every object of that relation there (Peru's languages), the best first
                    f.used = True
                out.answer = ", ".join(dict.fromkeys(f.object if normalize(f.subject) == f.via else f.subject
                                                     for f in last))
                out.supported = True
                out.seconds = time.perf_counter() - t0
                return out
        elif mode == "vector":
            out.facts = self.vector_facts(question)
        elif mode == "cypher":
            self._cypher_facts(question, out)
            if not out.facts:
                out.answer = ("I don't know: the model's query found no fact in the graph" if out.error is None
                              else "I don't know: the model's query was not run (see error)")
                out.abstained = True
                out.seconds = time.perf_counter() - t0
                return out
        out.generated = self.llm(answer_prompt(question, [f.text for f in out.facts])).strip()
        out.answer = out.generated
        said, asked = _padded(out.answer), fold(question)
        for f in out.facts:  # the end the question does not name (the object first) must be in the answer
            end = next((x for x in (f.object, f.subject) if x and fold(x) not in asked), "")
            f.used = bool(said.strip() and end) and _padded(end) in said
        out.supported = any(f.used for f in out.facts)
        if mode != "none" and not out.supported:  # "none" is the no-context baseline: nothing to check against
            out.answer, out.abstained = (f"I don't know: the facts given do not support the model's answer "
                                         f"({out.generated!r})"), True
        out.seconds = time.perf_counter() - t0
        return out

    def missing(self, question: str, linked: list[str], facts: list[Fact]) -> str | None:
        """What the graph has no fact about (for "I don't know: no fact about ..."), or None if it may answer:
        no entity linked -> the question's unlinked name ("Atlantis"); the question names a relation that no
        retrieved fact has -> "the president of France"."""
        if not linked:
            return self._unlinked_name(question)
        if not facts:
            return " and ".join(self.entities[e].name for e in linked)
        qwords = {_stem(w) for w in words(question) if w not in STOPWORDS}
        if any(relation_named(f.relation, qwords) for f in facts):
            return None
        entity_words = {w for e in linked for n in (e, normalize(self.entities[e].name)) for w in n.split()}
        asked = [w for w in words(question) if w not in STOPWORDS and w not in FILLER and w not in entity_words]
        if not asked:  # "France?": no relation asked for, the facts may answer
            return None
        return f"the {' '.join(asked)} of {' and '.join(self.entities[e].name for e in linked)}"

    @staticmethod
    def _unlinked_name(question: str) -> str:
        """The question's likely subject when no entity matched: its capitalised words after the first
        ("Atlantis"), else its content words."""
        raw = re.findall(r"[\w'-]+", question)
        runs, cur = [], []
        for i, w in enumerate(raw):
            if i > 0 and w[:1].isupper() and w.lower() not in STOPWORDS:
                cur.append(w)
            else:
                if cur:
                    runs.append(" ".join(cur))
                cur = []
        if cur:
            runs.append(" ".join(cur))
        if runs:
            return max(runs, key=len)
        content = [w for w in words(question) if w not in STOPWORDS and w not in FILLER]
        return " ".join(content) or "that"

    def _cypher_facts(self, question: str, out: Answer) -> None:
        relations = sorted({t.relation for t in self.store.triples()})[:30]
        reply = self.cypher_llm(CYPHER_PROMPT.format(schema=CYPHER_SCHEMA, relations=", ".join(relations), question=question))
        out.cypher = extract_cypher(reply)
        try:
            rows = self.store.read_query(check_read_query(out.cypher))
        except UserError as e:
            out.error = str(e)
            return
        out.facts = [Fact("", "cypher", ", ".join(map(str, r)), ", ".join(map(str, r))) for r in rows[:self.max_facts]]


def model_llm(lm: Any, max_new_tokens: int = 24, stop: tuple[str, ...] = ("\n",)) -> LLM:
    """A loaded chat model (``load_model(...)``) as an :data:`LLM`: chat template, greedy decoding
    through the decoding lab's ``generate``. Answers stop at the first newline; for Cypher use
    ``model_llm(lm, 64, ())`` (a query may sit in a fenced block)."""
    from llmcourse.decoding import GenerationConfig, chat_prompt_ids, generate

    cfg = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens, stop=stop)

    def llm(prompt: str | list[dict[str, str]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = chat_prompt_ids(lm.tokenizer, messages)
        return generate(lm.model, lm.tokenizer, ids, cfg).sequences[0].text

    return llm
