"""Public API: quantize float32 rows to ggml's bytes and back, bit-exact with ggml.

``quantize(data, qtype, imatrix)`` is ``ggml_quantize_chunk(qtype, data, ..., imatrix)`` of
llama.cpp's ``libggml-base``: same bytes for every supported type, with or without an importance
matrix. The row is cut into blocks (``blocks.py``); the kernels live in ``legacy.py`` and
``kquants.py``. Rows are processed in chunks so the working arrays of the searches stay in cache.

Which C path this mirrors: without an imatrix every type uses ggml's ``quantize_row_*_ref``;
with one, ``quantize_row_*_impl`` (weighted searches; the legacy types also weigh each value by
``sqrt(sigma2 + x^2)`` with ``sigma2`` the row's mean square); Q8_0 ignores the imatrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from llmcourse.core.errors import UserError
from llmcourse.quant.gguf import kquants, legacy  # noqa: F401  (registers the kernels)
from llmcourse.quant.gguf.blocks import KERNELS, LAYOUTS
from llmcourse.quant.gguf.searches import F32, seq_sum

QUANT_TYPES: tuple[T, ...] = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})

# values per chunk: large enough to amortise numpy's per-call cost, small enough for the cache
CHUNK_VALUES = 1 << 17


def _kernel(qtype: T):
    if qtype not in KERNELS:
        names = ", ".join(t.name for t in QUANT_TYPES)
        raise UserError(f"quantization type {getattr(qtype, 'name', qtype)} is not supported", f"use one of {names}")
    return KERNELS[qtype]


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The kernels use torch only for short per-block reductions; its thread pool spins badly on a
    busy machine (40x slower here), and ggml's quantizer is single-threaded too."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def row_bytes(qtype: T, n_per_row: int) -> int:
    """Bytes of one quantized row of ``n_per_row`` values."""
    return LAYOUTS[qtype].row_bytes(n_per_row)


def quantize(data: np.ndarray, qtype: T, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows ``data`` (..., n_per_row) to ggml's bytes (..., row_bytes), uint8.

    ``imatrix`` (n_per_row,) weighs each column (the mean squared activation feeding it); None
    uses ggml's unweighted reference path. Raises UserError if n_per_row is not a multiple of the
    type's block size or the imatrix has the wrong length.
    """
    kernel = _kernel(qtype)
    x = np.asarray(data, dtype=F32)
    if x.ndim == 0:
        raise UserError("cannot quantize a scalar", "pass an array of rows")
    n = x.shape[-1]
    bs = kernel.block_size
    if n == 0 or n % bs:
        raise UserError(f"rows of {n} values are not a multiple of {qtype.name}'s block of {bs}",
                        "pick a type whose block size divides the row length")
    qw = None
    if imatrix is not None:
        qw = np.asarray(imatrix, dtype=F32).reshape(-1)
        if qw.shape[0] != n:
            raise UserError(f"the importance matrix has {qw.shape[0]} values for rows of {n}",
                            "use the imatrix entry computed for this tensor")
    rows = x.reshape(-1, n)
    nb = n // bs
    out = np.empty((rows.shape[0], nb * kernel.type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // n)
    with _one_torch_thread():
        _quantize_rows(kernel, rows, qw, out, step)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _quantize_rows(kernel, rows: np.ndarray, qw: np.ndarray | None, out: np.ndarray, step: int) -> None:
    qtype, bs = kernel.qtype, kernel.block_size
    n = rows.shape[1]
    nb = n // bs
    for r0 in range(0, rows.shape[0], step):
        chunk = np.ascontiguousarray(rows[r0:r0 + step])
        nr = chunk.shape[0]
        blocks = chunk.reshape(nr * nb, bs)
        bqw = sigma2 = None
        if qw is not None:
            bqw = np.broadcast_to(qw.reshape(1, nb, bs), (nr, nb, bs)).reshape(nr * nb, bs)
            if qtype in LEGACY_TYPES:
                # sigma2 = sum_x2 / n_per_row over the whole row, summed in C's order
                s2 = seq_sum(np.ascontiguousarray(chunk.T * chunk.T)) / F32(n)
                sigma2 = np.repeat(s2, nb)
        kernel.quantize_blocks(blocks, bqw, sigma2, out=out[r0:r0 + nr].reshape(nr * nb, kernel.type_size))


def dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    """Inverse layout of :func:`quantize`: bytes (..., row_bytes) -> float32 (..., n_per_row)."""
    kernel = _kernel(qtype)
    r = np.asarray(raw, dtype=np.uint8)
    if r.ndim == 0 or r.shape[-1] % kernel.type_size:
        raise UserError(f"rows of {r.shape[-1] if r.ndim else 0} bytes are not whole {qtype.name} blocks "
                        f"of {kernel.type_size} bytes", "check the tensor's type and shape")
    nb = r.shape[-1] // kernel.type_size
    blocks = np.ascontiguousarray(r).reshape(-1, kernel.type_size)
    vals = kernel.dequantize_blocks(blocks)
    return vals.reshape(*r.shape[:-1], nb * kernel.block_size)
