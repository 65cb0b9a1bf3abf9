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

from gguf.constants import GGML_QUANT_SIZES

from llmcourse.core.errors import UserError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types (gguf spec): size in bytes for fixed-size scalars.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


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

    Returns ``(n_tensors, n_kv)``. Only lengths and offsets are checked; the tensor data
    itself is checked by the reader that maps it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        buf = f.read(min(size, 64 * 1024 * 1024))
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(buf):
            raise _corrupt(path, "header runs past the end of the file", "GGUF")
        b = buf[pos:pos + n]
        pos += n
        return b

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def u64() -> int:
        return struct.unpack("<Q", take(8))[0]

    def string() -> None:
        n = u64()
        take(n)

    if take(4) != GGUF_MAGIC:
        raise _corrupt(path, "no GGUF magic", "GGUF")
    version = u32()
    if version not in (2, 3):
        raise _corrupt(path, f"unsupported version {version}", "GGUF")
    n_tensors, n_kv = u64(), u64()
    if n_tensors > size // 24 or n_kv > size // 12:
        raise _corrupt(path, f"{n_tensors} tensors / {n_kv} keys cannot fit in {size} bytes", "GGUF")

    def value(t: int, depth: int = 0) -> None:
        if t in _GGUF_SCALAR:
            take(_GGUF_SCALAR[t])
        elif t == _GGUF_STRING:
            string()
        elif t == _GGUF_ARRAY and depth == 0:
            et, n = u32(), u64()
            if et in _GGUF_SCALAR:
                take(_GGUF_SCALAR[et] * n)
            elif et in (_GGUF_STRING, _GGUF_ARRAY):
                if n > size:
                    raise _corrupt(path, "array longer than the file", "GGUF")
                for _ in range(n):
                    value(et, depth + 1)
            else:
                raise _corrupt(path, f"unknown array type {et}", "GGUF")
        else:
            raise _corrupt(path, f"unknown metadata type {t}", "GGUF")

    alignment = 32
    for _ in range(n_kv):
        key_len = u64()
        key = take(key_len)
        t = u32()
        if key == b"general.alignment" and t == 4:  # uint32
            alignment = struct.unpack("<I", buf[pos:pos + 4])[0] if pos + 4 <= len(buf) else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise _corrupt(path, f"alignment {alignment} is not a power of two", "GGUF")
        value(t)
    infos = []
    for _ in range(n_tensors):
        string()
        n_dims = u32()
        if not 1 <= n_dims <= 4:
            raise _corrupt(path, f"tensor with {n_dims} dimensions", "GGUF")
        dims = [u64() for _ in range(n_dims)]
        if any(d > 2**40 for d in dims):
            raise _corrupt(path, "tensor dimension too large", "GGUF")
        infos.append((dims, u32(), u64()))
    data_start = -(-pos // alignment) * alignment
    for dims, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise _corrupt(path, f"unknown tensor type {qtype}", "GGUF")
        block, type_size = GGML_QUANT_SIZES[qtype]
        numel = 1
        for d in dims:
            numel *= d
        if dims[0] % block:
            raise _corrupt(path, f"row of {dims[0]} is not a multiple of the block size {block}", "GGUF")
        if data_start + offset + numel // block * type_size > size:
            raise _corrupt(path, "tensor data runs past the end of the file", "GGUF")
    return n_tensors, n_kv
