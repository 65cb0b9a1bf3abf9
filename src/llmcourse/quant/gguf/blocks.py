"""Block layouts of ggml's quantization types: sizes as arithmetic, fields in byte order.

Source: ``ggml/src/ggml-common.h`` (``block_q4_0`` ... ``block_q6_K``). Every type cuts a row of
weights into blocks of ``block_size`` values and stores each block as a C struct of ``type_size``
bytes; a row of ``n`` values takes ``n // block_size * type_size`` bytes. The legacy types use
blocks of 32 (``QK``); the k-quants use super-blocks of 256 (``QK_K``) split into sub-blocks of
16 or 32 that carry their own 4-, 6- or 8-bit scales.

Bits per weight = ``8 * type_size / block_size``, e.g. Q4_K: 8 * 144 / 256 = 4.5.

``split_fields`` views a ``(n_blocks, type_size)`` byte array as its named fields and
``join_fields`` packs them back, so each kernel reads like the struct it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

QK = 32  # values per block of the legacy types (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0)
QK_K = 256  # values per super-block of the k-quants
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K
F16 = 2  # bytes of a ggml_half


@dataclass(frozen=True)
class BlockLayout:
    """One block type: how many values a block holds and its fields (name, bytes) in struct order."""

    qtype: T
    block_size: int
    fields: tuple[tuple[str, int], ...]

    @property
    def type_size(self) -> int:
        """Bytes per block (sum of the field sizes; ggml's structs have no padding)."""
        return sum(n for _, n in self.fields)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` values (a multiple of ``block_size``)."""
        return n_per_row // self.block_size * self.type_size


LAYOUTS: dict[T, BlockLayout] = {
    # legacy: one fp16 scale d (and min m), 4- or 5-bit quants, the 5th bits gathered in qh
    T.Q4_0: BlockLayout(T.Q4_0, QK, (("d", F16), ("qs", QK // 2))),
    T.Q4_1: BlockLayout(T.Q4_1, QK, (("d", F16), ("m", F16), ("qs", QK // 2))),
    T.Q5_0: BlockLayout(T.Q5_0, QK, (("d", F16), ("qh", QK // 8), ("qs", QK // 2))),
    T.Q5_1: BlockLayout(T.Q5_1, QK, (("d", F16), ("m", F16), ("qh", QK // 8), ("qs", QK // 2))),
    T.Q8_0: BlockLayout(T.Q8_0, QK, (("d", F16), ("qs", QK))),
    # k-quants: super-block scale d (and dmin) in fp16, quantized sub-block scales, packed quants
    T.Q2_K: BlockLayout(T.Q2_K, QK_K, (("scales", QK_K // 16), ("qs", QK_K // 4), ("d", F16), ("dmin", F16))),
    T.Q3_K: BlockLayout(T.Q3_K, QK_K, (("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", 12), ("d", F16))),
    T.Q4_K: BlockLayout(T.Q4_K, QK_K, (("d", F16), ("dmin", F16), ("scales", K_SCALE_SIZE), ("qs", QK_K // 2))),
    T.Q5_K: BlockLayout(T.Q5_K, QK_K, (("d", F16), ("dmin", F16), ("scales", K_SCALE_SIZE),
                                       ("qh", QK_K // 8), ("qs", QK_K // 2))),
    T.Q6_K: BlockLayout(T.Q6_K, QK_K, (("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", F16))),
}


def split_fields(raw: np.ndarray, layout: BlockLayout) -> dict[str, np.ndarray]:
    """Views of the fields of ``raw`` (n_blocks, type_size) uint8: fp16 fields as float16 (n,),
    byte fields as uint8 (n, bytes)."""
    out: dict[str, np.ndarray] = {}
    off = 0
    for name, n in layout.fields:
        part = raw[:, off:off + n]
        out[name] = part.copy().view(np.float16)[:, 0] if name in ("d", "m", "dmin") else part
        off += n
    return out


def join_fields(layout: BlockLayout, out: np.ndarray | None = None, **fields: np.ndarray) -> np.ndarray:
    """Pack fields into (n_blocks, type_size) uint8 (into ``out`` when given); fp16 fields are
    given as float16 (n,)."""
    n_blocks = fields[layout.fields[0][0]].shape[0]
    if out is None:
        out = np.empty((n_blocks, layout.type_size), dtype=np.uint8)
    off = 0
    for name, n in layout.fields:
        v = fields[name]
        if v.dtype == np.float16:
            v = np.ascontiguousarray(v).view(np.uint8).reshape(-1, 2)
        out[:, off:off + n] = v.reshape(n_blocks, n)
        off += n
    return out


class BlockQuant:
    """One quantization type: ``quantize_blocks`` / ``dequantize_blocks`` on (n_blocks, block_size).

    Subclasses declare ``class Q4_0(BlockQuant, qtype=T.Q4_0)`` and are collected in ``KERNELS``.
    ``quantize_blocks(blocks, qw=None, sigma2=None, out=None)`` takes float32 (n_blocks,
    block_size), the importance weights of each block's columns ``qw`` (same shape) when an
    imatrix is used, and for the legacy types the mean square of each block's whole row
    ``sigma2`` (n_blocks,); it returns (or fills ``out`` with) the (n_blocks, type_size) bytes.
    """

    qtype: T
    layout: BlockLayout
    block_size: int
    type_size: int

    def __init_subclass__(cls, qtype: T | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if qtype is not None:
            cls.qtype = qtype
            cls.layout = LAYOUTS[qtype]
            cls.block_size = cls.layout.block_size
            cls.type_size = cls.layout.type_size
            KERNELS[qtype] = cls

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, qw: np.ndarray | None = None,
                        sigma2: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError


KERNELS: dict[T, type[BlockQuant]] = {}
