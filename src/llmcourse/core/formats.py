"""Cheap structural checks of checkpoint files before a library parses them.

Parsers of safetensors and GGUF trust the lengths written in the header; a truncated or
corrupted file can make them raise odd errors, allocate huge buffers, or loop for long.
These checks read only the header, verify every length and offset against the file
size, and raise a one-line :class:`UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import check_tensor_data, read_gguf_header


def _corrupt(path: Path, what: str, kind: str) -> UserError:
    return UserError(
        f"{path} is not a valid {kind} file ({what})",
        "the file is truncated or corrupt: re-download or re-convert it",
    )


def check_safetensors(path: str | Path) -> dict:
    """Validate a .safetensors header against the file size; return the header dict."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than its 8-byte header length", "safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > 100_000_000 or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in {size} bytes", "safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not JSON", "safetensors") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object", "safetensors")
    data_len = size - 8 - n
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape = info["shape"]
            dtype = info["dtype"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for tensor {name!r}", "safetensors") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise _corrupt(path, f"tensor {name!r} lies outside the file", "safetensors")
        if dtype in sizes and numel * sizes[dtype] != end - start:
            raise _corrupt(path, f"tensor {name!r} size does not match its shape", "safetensors")
    return header


def check_gguf(path: str | Path) -> tuple[int, int]:
    """Validate a GGUF header (magic, version, metadata, tensor infos) against the file size.

    Returns ``(n_tensors, n_kv)``. Parsed by the project's one GGUF header parser
    (:func:`llmcourse.core.gguf_container.read_gguf_header`), which checks every length it reads;
    then every tensor's data must lie inside the file. The tensor data itself is checked by the
    reader that maps it.
    """
    path = Path(path)
    try:
        kvs, infos = read_gguf_header(path)
        check_tensor_data(infos, path.stat().st_size)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, str(e)[:160] or type(e).__name__, "GGUF") from None
    return len(infos), len(kvs)
