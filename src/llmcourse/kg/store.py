"""Graph storage: one small interface, an embedded LadybugDB folder by default, networkx in memory.

LadybugDB (PyPI ``ladybug``) is the maintained fork of Kùzu, an embedded property-graph database
queried with Cypher. The schema is two tables::

    NODE TABLE Entity(id STRING PRIMARY KEY, name STRING, type STRING, aliases STRING[], props STRING)
    REL TABLE REL(FROM Entity TO Entity, relation STRING, source STRING)

so several relations between one pair of entities are several edges (multi-edges kept). Every query
the lab runs is parameterised (``$ids``, ``$rows``): question text is never spliced into Cypher. A
graph folder is ``graph.lbdb`` plus ``kg.json`` (format, source, counts); :func:`open_graph` opens it
read-only, so nothing asked of it can write. Cypher written by a model (``--mode cypher``) must also
pass :func:`check_read_query` before it runs. :class:`Neo4jStore` puts the same interface on a Neo4j
server (the official ``neo4j`` driver) for graphs that outgrow one process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from llmcourse.core.errors import UserError
from llmcourse.kg.triples import Entity, Triple, entities_of, normalize

FORMAT = "llmcourse-kg"
DB_FILE = "graph.lbdb"
META_FILE = "kg.json"
SCHEMA = [
    "CREATE NODE TABLE Entity(id STRING PRIMARY KEY, name STRING, type STRING, aliases STRING[], props STRING)",
    "CREATE REL TABLE REL(FROM Entity TO Entity, relation STRING, source STRING)",
]
CYPHER_SCHEMA = ("(:Entity {id STRING, name STRING, type STRING, aliases STRING[]})-[:REL {relation STRING}]->"
                 "(:Entity); id is the lower-cased name")


class GraphStore(Protocol):
    """What the lab needs from a graph: add, list, the edges touching some entities, read queries."""

    def add(self, entities: list[Entity], triples: list[Triple]) -> None: ...
    def entities(self) -> list[Entity]: ...
    def edges_touching(self, ids: list[str]) -> list[Triple]: ...
    def triples(self) -> list[Triple]: ...
    def read_query(self, cypher: str, params: dict[str, Any] | None = None) -> list[list[Any]]: ...
    def close(self) -> None: ...


def neighbourhood(store: GraphStore, ids: Iterable[str], hops: int = 1) -> list[tuple[Triple, int]]:
    """Edges within ``hops`` of ``ids``, in both directions, each with the hop it was reached at (1-based)."""
    frontier, seen_nodes = {*ids}, {*ids}
    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[Triple, int]] = []
    for hop in range(1, hops + 1):
        if not frontier:
            break
        nxt: set[str] = set()
        for t in store.edges_touching(sorted(frontier)):
            key = (normalize(t.subject), t.relation, normalize(t.object))
            if key in seen:
                continue
            seen.add(key)
            out.append((t, hop))
            for end in (key[0], key[2]):
                if end not in seen_nodes:
                    seen_nodes.add(end)
                    nxt.add(end)
        frontier = nxt
    return out


# --- networkx, in memory ------------------------------------------------------------------------------

class NetworkxStore:
    """A ``networkx.MultiDiGraph`` (multi-edges kept): for small graphs and tests. No Cypher."""

    def __init__(self) -> None:
        import networkx as nx

        self.graph = nx.MultiDiGraph()

    def add(self, entities: list[Entity], triples: list[Triple]) -> None:
        for e in entities_of(triples, entities):
            if e.id not in self.graph:
                self.graph.add_node(e.id, entity=e)
        for t in triples:
            self.graph.add_edge(normalize(t.subject), normalize(t.object), key=t.relation, triple=t)

    def entities(self) -> list[Entity]:
        return [d["entity"] for _, d in self.graph.nodes(data=True)]

    def edges_touching(self, ids: list[str]) -> list[Triple]:
        out = []
        for i in ids:
            if i in self.graph:
                out += [d["triple"] for _, _, d in self.graph.out_edges(i, data=True)]
                out += [d["triple"] for _, _, d in self.graph.in_edges(i, data=True)]
        return out

    def triples(self) -> list[Triple]:
        return [d["triple"] for _, _, d in self.graph.edges(data=True)]

    def read_query(self, cypher: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        raise UserError("an in-memory networkx graph does not run Cypher", "build a graph folder with `llmcourse kg build`")

    def close(self) -> None:
        pass


# --- LadybugDB, embedded ------------------------------------------------------------------------------

class LadybugStore:
    """A LadybugDB database file; ``read_only=True`` for asking (the database refuses any write)."""

    def __init__(self, path: str | Path, read_only: bool = True) -> None:
        import ladybug

        self.path = Path(path)
        try:
            self.db = ladybug.Database(str(self.path), read_only=read_only)
            self.conn = ladybug.Connection(self.db)
        except RuntimeError as e:
            raise UserError(f"cannot open the graph database {self.path} ({str(e)[:150]})",
                            "rebuild it with `llmcourse kg build`") from e
        self.read_only = read_only
        if not read_only and not self._tables():
            for q in SCHEMA:
                self.conn.execute(q)

    def _tables(self) -> list[str]:
        return [r[1] for r in self._rows("CALL show_tables() RETURN *")]

    def _rows(self, cypher: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        res = self.conn.execute(cypher, params or {})
        out = []
        for r in res if isinstance(res, list) else [res]:
            while r.has_next():
                out.append(r.get_next())
        return out

    def add(self, entities: list[Entity], triples: list[Triple]) -> None:
        existing = {r[0] for r in self._rows("MATCH (e:Entity) RETURN e.id")}
        rows = [{"id": e.id, "name": e.name, "type": e.type, "aliases": list(e.aliases),
                 "props": json.dumps(e.props)} for e in entities_of(triples, entities) if e.id not in existing]
        if rows:
            self.conn.execute("UNWIND $rows AS r CREATE (:Entity {id: r.id, name: r.name, type: r.type, "
                              "aliases: r.aliases, props: r.props})", {"rows": rows})
        edges = [{"s": normalize(t.subject), "o": normalize(t.object), "r": t.relation, "src": t.source}
                 for t in triples]
        if edges:
            self.conn.execute("UNWIND $rows AS r MATCH (a:Entity {id: r.s}), (b:Entity {id: r.o}) "
                              "CREATE (a)-[:REL {relation: r.r, source: r.src}]->(b)", {"rows": edges})

    def entities(self) -> list[Entity]:
        return [Entity(i, n, t, list(a or []), json.loads(p or "{}"))
                for i, n, t, a, p in self._rows("MATCH (e:Entity) RETURN e.id, e.name, e.type, e.aliases, e.props")]

    _EDGES = ("MATCH (a:Entity)-[r:REL]->(b:Entity) {where} "
              "RETURN a.name, r.relation, b.name, a.type, b.type, r.source")

    def edges_touching(self, ids: list[str]) -> list[Triple]:
        q = self._EDGES.format(where="WHERE a.id IN $ids OR b.id IN $ids")
        return [Triple(*r) for r in self._rows(q, {"ids": list(ids)})]

    def triples(self) -> list[Triple]:
        return [Triple(*r) for r in self._rows(self._EDGES.format(where=""))]

    def read_query(self, cypher: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        check_read_query(cypher)
        try:
            return self._rows(cypher, params)
        except RuntimeError as e:
            raise UserError(f"the Cypher query failed ({str(e)[:150]})", "fix the query") from e

    def counts(self) -> dict[str, int]:
        return {"entities": self._rows("MATCH (e:Entity) RETURN count(e)")[0][0],
                "edges": self._rows("MATCH ()-[r:REL]->() RETURN count(r)")[0][0]}

    def close(self) -> None:
        self.conn.close()
        self.db.close()


# --- Neo4j, a server (optional) ---------------------------------------------------------------------

class Neo4jStore:
    """The same interface on a Neo4j server through the official ``neo4j`` driver (for graphs that
    outgrow one process). ``label`` and ``rel`` name the node label and relationship type, so a test
    or a second graph can live beside others; reads run in read transactions (``execute_read``)."""

    def __init__(self, uri: str, auth: tuple[str, str] | None = None, database: str | None = None,
                 label: str = "Entity", rel: str = "REL") -> None:
        import neo4j

        if not (label.isidentifier() and rel.isidentifier()):
            raise UserError(f"bad Neo4j label {label!r} or type {rel!r}", "use letters, digits and _")
        self.driver = neo4j.GraphDatabase.driver(uri, auth=auth)
        self.database, self.label, self.rel = database, label, rel

    def _run(self, cypher: str, params: dict[str, Any] | None = None, write: bool = False) -> list[list[Any]]:
        def work(tx: Any) -> list[list[Any]]:
            return [list(r.values()) for r in tx.run(cypher, params or {})]

        with self.driver.session(database=self.database) as session:
            return session.execute_write(work) if write else session.execute_read(work)

    def add(self, entities: list[Entity], triples: list[Triple]) -> None:
        rows = [{"id": e.id, "name": e.name, "type": e.type, "aliases": list(e.aliases), "props": json.dumps(e.props)}
                for e in entities_of(triples, entities)]
        self._run(f"UNWIND $rows AS r MERGE (e:{self.label} {{id: r.id}}) "
                  "SET e.name = r.name, e.type = r.type, e.aliases = r.aliases, e.props = r.props", {"rows": rows}, True)
        edges = [{"s": normalize(t.subject), "o": normalize(t.object), "r": t.relation, "src": t.source} for t in triples]
        self._run(f"UNWIND $rows AS r MATCH (a:{self.label} {{id: r.s}}), (b:{self.label} {{id: r.o}}) "
                  f"CREATE (a)-[:{self.rel} {{relation: r.r, source: r.src}}]->(b)", {"rows": edges}, True)

    def entities(self) -> list[Entity]:
        q = f"MATCH (e:{self.label}) RETURN e.id, e.name, e.type, e.aliases, e.props"
        return [Entity(i, n, t, list(a or []), json.loads(p or "{}")) for i, n, t, a, p in self._run(q)]

    def _edges(self, where: str, params: dict[str, Any] | None = None) -> list[Triple]:
        q = (f"MATCH (a:{self.label})-[r:{self.rel}]->(b:{self.label}) {where} "
             "RETURN a.name, r.relation, b.name, a.type, b.type, r.source")
        return [Triple(*r) for r in self._run(q, params)]

    def edges_touching(self, ids: list[str]) -> list[Triple]:
        return self._edges("WHERE a.id IN $ids OR b.id IN $ids", {"ids": list(ids)})

    def triples(self) -> list[Triple]:
        return self._edges("")

    def read_query(self, cypher: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        return self._run(check_read_query(cypher), params)

    def drop(self) -> None:
        """Delete this store's nodes and edges (its label only)."""
        self._run(f"MATCH (e:{self.label}) DETACH DELETE e", write=True)

    def close(self) -> None:
        self.driver.close()


# --- read-only Cypher -----------------------------------------------------------------------------------

WRITE_WORDS = ("CREATE", "MERGE", "DELETE", "DETACH", "SET", "REMOVE", "DROP", "ALTER", "COPY", "LOAD",
               "INSTALL", "ATTACH", "DETACH", "IMPORT", "EXPORT", "CALL", "USE", "CHECKPOINT", "BEGIN",
               "COMMIT", "ROLLBACK", "FOREACH")
_WRITE = re.compile(r"\b(" + "|".join(WRITE_WORDS) + r")\b", re.IGNORECASE)


def check_read_query(cypher: str) -> str:
    """Return ``cypher`` if it is one read query (MATCH ... RETURN ...); raise UserError otherwise.

    Conservative: any write or procedure keyword anywhere (even inside a string literal) rejects it,
    as does a second statement. It runs on a read-only connection as well.
    """
    q = cypher.strip().rstrip(";").strip()
    if ";" in q:
        raise UserError("the Cypher query has more than one statement", "write one MATCH ... RETURN query")
    if not re.match(r"^(OPTIONAL\s+MATCH|MATCH|WITH|UNWIND|RETURN)\b", q, re.IGNORECASE):
        raise UserError("the Cypher query is not a read query", "start it with MATCH")
    if m := _WRITE.search(q):
        raise UserError(f"the Cypher query uses {m.group(1).upper()}, which is not allowed",
                        "write a read-only MATCH ... RETURN query")
    if not re.search(r"\bRETURN\b", q, re.IGNORECASE):
        raise UserError("the Cypher query returns nothing", "end it with RETURN")
    return q


# --- graph folders ------------------------------------------------------------------------------------

def write_graph(folder: Path, entities: list[Entity], triples: list[Triple], meta: dict[str, Any]) -> dict[str, Any]:
    """Create ``folder/graph.lbdb`` and ``folder/kg.json`` (``folder`` is a fresh temporary folder)."""
    store = LadybugStore(folder / DB_FILE, read_only=False)
    try:
        store.add(entities, triples)
        counts = store.counts()
    finally:
        store.close()
    info = {"format": FORMAT, "version": 1, **meta, **counts}
    (folder / META_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``kg.json`` of a graph folder, checked (a missing or foreign folder is a UserError)."""
    folder = Path(folder)
    fix = "build one with `llmcourse kg build --source countries --out DB`"
    if not folder.is_dir():
        raise UserError(f"graph folder {folder} does not exist", fix)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} is not a llmcourse graph folder (no {META_FILE})", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / META_FILE} is corrupt ({e})", fix) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder} is not a llmcourse graph folder", fix)
    if not (folder / DB_FILE).is_file():
        raise UserError(f"{folder} has no {DB_FILE}", fix)
    return meta


def open_graph(folder: str | Path) -> LadybugStore:
    """Open a graph folder read-only."""
    read_meta(folder)
    return LadybugStore(Path(folder) / DB_FILE, read_only=True)
