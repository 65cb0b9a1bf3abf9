"""ggml's C quantizers through ctypes: the reference our kernels must match byte for byte.

``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` and the type traits'
``to_float`` come from ``libggml-base.so`` in llama-cpp-python's ``lib/`` folder. Used by the
tests and by ``bench/gguf_exact.py`` / ``bench/gguf_kernels.py``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_LIB: ctypes.CDLL | None = None


def lib_path() -> Path | None:
    """Path of libggml-base.so shipped with llama-cpp-python, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "lib" / "libggml-base.so"
        if p.exists():
            return p
    return None


def lib() -> ctypes.CDLL:
    """Load libggml-base.so once and declare the signatures we use."""
    global _LIB
    if _LIB is None:
        path = lib_path()
        if path is None:
            raise RuntimeError("llama-cpp-python (libggml-base.so) is not installed")
        L = ctypes.CDLL(str(path))
        L.ggml_quantize_chunk.restype = ctypes.c_size_t
        L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        L.ggml_row_size.restype = ctypes.c_size_t
        L.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        L.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        L.ggml_get_type_traits.argtypes = [ctypes.c_int]
        _LIB = L
    return _LIB


def quantize(data: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over all rows of ``data`` (..., n_per_row) -> uint8 (..., row_bytes)."""
    L = lib()
    x = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row
    row_size = L.ggml_row_size(int(qtype), n_per_row)
    out = np.zeros((nrows, row_size), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert qw.shape == (n_per_row,)
    n = L.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row,
                              None if qw is None else qw.ctypes.data)
    assert n == out.size
    return out.reshape(*x.shape[:-1], row_size)


def dequantize(raw: np.ndarray, qtype: int, n_per_row: int) -> np.ndarray:
    """The type's ``to_float`` over every row of ``raw`` (..., row_bytes) -> float32 (..., n_per_row)."""
    L = lib()
    r = np.ascontiguousarray(raw, dtype=np.uint8)
    nrows = r.size // r.shape[-1]
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    fn = _TO_FLOAT(L.ggml_get_type_traits(int(qtype)).contents.to_float)
    fn(r.ctypes.data, out.ctypes.data, nrows * n_per_row)
    return out.reshape(*r.shape[:-1], n_per_row)


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def read_imatrix_gguf(path: str) -> dict[str, np.ndarray]:
    """Parse an imatrix GGUF with ggml's own reader (gguf_init_from_file) and normalise it as
    llama-quantize does: values = in_sum2 / count per matrix (1 where the count is 0)."""
    L = lib()
    L.gguf_init_from_file.restype = ctypes.c_void_p
    L.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    for fn, res, args in (("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_data_offset", ctypes.c_size_t, [ctypes.c_void_p]),
                          ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
                          ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
                          ("gguf_free", None, [ctypes.c_void_p])):
        getattr(L, fn).restype = res
        getattr(L, fn).argtypes = args
    ctx = L.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, "ggml could not parse the file"
    try:
        assert L.gguf_get_val_str(ctx, L.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        for key in (b"imatrix.datasets", b"imatrix.chunk_count", b"imatrix.chunk_size"):
            assert L.gguf_find_key(ctx, key) >= 0, key
        raw = open(path, "rb").read()
        base = L.gguf_get_data_offset(ctx)
        tensors = {}
        for i in range(L.gguf_get_n_tensors(ctx)):
            assert L.gguf_get_tensor_type(ctx, i) == 0  # F32
            off = base + L.gguf_get_tensor_offset(ctx, i)
            n = L.gguf_get_tensor_size(ctx, i) // 4
            tensors[L.gguf_get_tensor_name(ctx, i).decode()] = np.frombuffer(raw, "<f4", n, off)
    finally:
        L.gguf_free(ctx)
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base_name = name[: -len(".in_sum2")]
        counts = tensors[base_name + ".counts"]
        ne0 = sums.size // counts.size
        v = np.empty(sums.size, dtype=np.float32)
        for j, c in enumerate(counts):
            c = np.float32(np.floor(c + 0.5))
            v[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / c if c > 0 else 1
        out[base_name] = v
    return out
