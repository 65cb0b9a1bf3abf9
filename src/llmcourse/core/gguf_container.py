"""The GGUF container: reading and writing the file, apart from what its tensors mean.

Source: the GGUF specification (ggml-org/ggml ``docs/gguf.md``) and gguf-py's ``GGUFWriter`` /
``GGUFReader``. A GGUF file (version 3, little endian) is::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)            string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, ne[0..n_dims) u64, type: u32, offset: u64)
    zero padding to ``general.alignment`` (32)
    tensor data, each tensor starting at a multiple of the alignment

``ne[0]`` is the fastest-varying dimension, so a torch weight of shape ``(out, in)`` is stored as
``ne = [in, out]``; :class:`Tensor` and :class:`TensorInfo` keep torch order. A tensor of
``n`` rows of ``n_per_row`` values in a block type of ``block`` values and ``type_size`` bytes takes
``n * (n_per_row / block) * type_size`` bytes (gguf-py's ``GGML_QUANT_SIZES``).

This is the one GGUF header parser of the project: :func:`read_gguf_header` also backs
``core.formats.check_gguf``, so every length and offset it trusts is checked against the file size.
It lives in core because core checks files before loading them; the GGUF lab builds its converter
and quantizer on it.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.constants import GGML_QUANT_SIZES

from llmcourse.core.io import atomic_file

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


# ---------------------------------------------------------------------------------------------

@dataclass
class KV:
    """One metadata entry: ``value`` is a Python scalar/str, or a list for ``VT.ARRAY`` of ``sub_type``."""

    key: str
    value: Any
    vtype: VT
    sub_type: VT | None = None


@dataclass
class Tensor:
    """One tensor to write: ``shape`` in torch order (rows ..., n_per_row); ``data()`` gives its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    data: Callable[[], np.ndarray]  # lazily computed, so a file streams one tensor at a time

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    """Bytes of a tensor of ``shape`` (torch order) in ``qtype``: rows * row_bytes."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_per_row = shape[-1]
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} is not a multiple of {qtype.name}'s block {block}")
    return math.prod(shape[:-1]) * (n_per_row // block) * type_size


_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d", VT.BOOL: "<?"}


_U64 = struct.Struct("<Q")


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _pack_value(value: Any, vtype: VT, sub_type: VT | None) -> bytes:
    if vtype == VT.STRING:
        return _pack_str(value)
    if vtype == VT.ARRAY:
        assert sub_type is not None
        out = [struct.pack("<IQ", sub_type, len(value))]
        if sub_type == VT.STRING:
            pack = _U64.pack
            for v in value:
                b = v.encode("utf-8", errors="surrogateescape")
                out += (pack(len(b)), b)
        else:
            out.append(np.asarray(value, dtype=np.dtype(_SCALAR[sub_type][1:]).newbyteorder("<")).tobytes())
        return b"".join(out)
    return struct.pack(_SCALAR[vtype], value)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def write_gguf(f: BinaryIO, kvs: list[KV], tensors: list[Tensor],
               progress: Callable[[Tensor], None] | None = None) -> int:
    """Write a whole GGUF file to the open binary file ``f``; return its size in bytes.

    Tensor data are produced one at a time (``Tensor.data()``), so memory stays at one tensor.
    """
    align = alignment(kvs)
    head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    for kv in kvs:
        head += [_pack_str(kv.key), struct.pack("<I", kv.vtype), _pack_value(kv.value, kv.vtype, kv.sub_type)]
    offset = 0
    for t in tensors:
        ne = list(reversed(t.shape))
        head += [_pack_str(t.name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                 struct.pack("<IQ", t.qtype, offset)]
        offset += _pad(t.nbytes, align)
    meta = b"".join(head)
    f.write(meta + b"\0" * (_pad(len(meta), align) - len(meta)))
    size = _pad(len(meta), align)
    for t in tensors:
        raw = np.ascontiguousarray(t.data())
        if raw.nbytes != t.nbytes:
            raise AssertionError(f"{t.name}: {raw.nbytes} bytes, expected {t.nbytes}")
        f.write(memoryview(raw.reshape(-1)).cast("B"))  # no copy of the tensor's bytes
        pad = _pad(raw.nbytes, align) - raw.nbytes
        f.write(b"\0" * pad)
        size += raw.nbytes + pad
        if progress is not None:
            progress(t)
    return size


def save_gguf(path: str | Path, kvs: list[KV], tensors: list[Tensor],
              progress: Callable[[Tensor], None] | None = None) -> int:
    """:func:`write_gguf` into ``path`` atomically (a temporary file renamed on success)."""
    with atomic_file(path) as f:
        return write_gguf(f, kvs, tensors, progress)


@dataclass
class TensorInfo:
    """A tensor of a GGUF file being read: ``shape`` in torch order, ``offset`` from the file's start."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    offset: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


class _Cursor:
    """Little-endian reads from a buffer (the inverse of the packing above)."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def _strings(self, n: int) -> list[str]:
        # the tokenizer's arrays hold ~50k strings each: a tight loop, no method calls per string
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = []
        for _ in range(n):
            (size,) = unpack(buf, pos)
            pos += 8
            if pos + size > end:
                raise ValueError("a string runs past the end of the file")
            out.append(buf[pos:pos + size].decode("utf-8", errors="surrogateescape"))
            pos += size
        self.pos = pos
        return out

    def value(self, vtype: VT) -> tuple[Any, VT | None]:
        if vtype == VT.STRING:
            return self.string(), None
        if vtype == VT.ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            sub = VT(sub)
            if sub == VT.STRING:
                return self._strings(n), sub
            if sub == VT.ARRAY:
                raise ValueError("nested arrays are not supported")
            dt = np.dtype(_SCALAR[sub][1:]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return arr.tolist(), sub
        return self.take(_SCALAR[vtype]), None


def read_gguf_header(path: str | Path) -> tuple[list[KV], list[TensorInfo]]:
    """Metadata and tensor infos of a GGUF file (tensor offsets made absolute).

    A plain ``struct`` parser: ``gguf.GGUFReader`` builds a numpy view per token and takes seconds
    on a 49k-token vocabulary.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm)
        if bytes(mm[:4]) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        c.pos = 4
        version, n_tensors, n_kv = c.take("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        if n_tensors > len(mm) // 24 or n_kv > len(mm) // 12:
            raise ValueError(f"{n_tensors} tensors / {n_kv} keys cannot fit in {len(mm)} bytes")
        kvs = []
        for _ in range(n_kv):
            key = c.string()
            vtype = VT(c.take("<I"))
            value, sub = c.value(vtype)
            kvs.append(KV(key, value, vtype, sub))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            ne = struct.unpack_from(f"<{n_dims}Q", mm, c.pos)
            c.pos += 8 * n_dims
            if any(d > 2**40 for d in ne):
                raise ValueError(f"tensor {name} has a dimension too large")
            qtype, offset = c.take("<IQ")
            infos.append(TensorInfo(name, tuple(int(x) for x in reversed(ne)), QT(qtype), offset))
        align = alignment(kvs)
        start = _pad(c.pos, align)
        check_layout(infos, align, len(mm) - start)
    for t in infos:
        t.offset += start
    return kvs, infos


def check_layout(infos: list[TensorInfo], align: int, data_size: int) -> None:
    """The tensors' relative offsets, before any data is read, as llama.cpp's ``gguf_init`` demands: in header
    order, each starts where the previous one's bytes (its type's block size x its shape), padded to the
    alignment, end; the data section holds them all and nothing more. A type, shape or offset that lies (an
    F32 tensor relabelled Q4_0 or F16, an offset moved by one byte, a tensor dropped from the list) breaks
    the chain: ValueError naming the tensor."""
    expected = 0
    for t in infos:
        if t.offset != expected:
            why = "is not aligned" if t.offset % align else "does not follow the previous tensor's bytes"
            raise ValueError(f"tensor {t.name} starts at data offset {t.offset}, expected {expected} ({why}: its "
                             f"type, shape or offset is wrong)")
        end = t.offset + t.nbytes  # nbytes raises for a row that is not a multiple of the type's block
        if end > data_size:
            raise ValueError(f"tensor {t.name} data runs past the end of the file")
        expected = _pad(end, align)
    if infos and data_size > expected:
        raise ValueError(f"{data_size - expected} bytes after the last tensor ({infos[-1].name}: its type or "
                         f"shape is wrong)")


def check_tensor_data(infos: list[TensorInfo], size: int) -> None:
    """Every tensor's rows fill whole blocks and its data lie inside a file of ``size`` bytes (else ValueError)."""
    for t in infos:
        if t.offset + t.nbytes > size:  # nbytes raises for a row that is not a multiple of the block
            raise ValueError(f"tensor {t.name} data runs past the end of the file")


def alignment(kvs: list[KV]) -> int:
    """The file's ``general.alignment`` (32 by default); a power of two, else ValueError."""
    align = next((int(kv.value) for kv in kvs if kv.key == "general.alignment"), ALIGNMENT)
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two")
    return align


def to_stored(t: torch.Tensor, qtype: QT) -> np.ndarray:
    """fp32 torch tensor -> the numpy array GGUF stores for ``qtype`` (F32, F16 or BF16 bits)."""
    if qtype == QT.F32:
        return t.contiguous().numpy()
    if qtype == QT.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == QT.BF16:  # round to nearest even, as gguf-py and ggml's fp32 -> bf16
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"not a float type: {qtype.name}")
