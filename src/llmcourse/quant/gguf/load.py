"""GGUF -> torch: a GGUF file's tensors read lazily, de-quantized to fp32, copied into a Hugging Face model.

The container is parsed by :func:`llmcourse.core.gguf_container.read_gguf_header`; each tensor is read
from its offset only when asked for (:class:`SourceTensor`), so quantizing a file streams one tensor at a
time. ``to_float32`` inverts the storage types (F16/BF16 bits, or our ggml de-quantizers); ``load_weights``
inverts the converter's names and q/k permutation (:mod:`.names`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, read_gguf_header, to_stored
from llmcourse.quant.gguf.convert import GGUFModel
from llmcourse.quant.gguf.names import architecture, from_gguf_layout, gguf_tensor_name, head_counts
from llmcourse.quant.gguf.quantize import dequantize


def is_quantized(qtype: QT) -> bool:
    """Whether ``qtype`` is a block-quantized type (not F32/F16/BF16 or an integer type)."""
    return qtype not in (QT.F32, QT.F16, QT.BF16, QT.F64, QT.I8, QT.I16, QT.I32, QT.I64)


@dataclass
class SourceTensor:
    """A tensor of the input: its stored type and a way to read it (raw bytes, or fp32)."""

    name: str
    shape: tuple[int, ...]  # torch order (rows..., n_per_row)
    qtype: QT
    raw: Callable[[], np.ndarray]  # the stored array (float array, or uint8 blocks)


def _read_at(path: Path, offset: int, dtype: Any, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` at ``offset`` of ``path``, read into a fresh (writable) array."""
    arr = np.empty(count, dtype=dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise UserError(f"GGUF {path} is truncated", "re-create the file")
    return arr


def read_gguf(path: str | Path) -> tuple[list[KV], list[SourceTensor]]:
    """Metadata and tensors of a GGUF file (tensors read on demand, one at a time)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist", "check the path")
    try:
        kvs, infos = read_gguf_header(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise UserError(f"cannot read GGUF {path} ({type(e).__name__}: {str(e)[:120]})",
                        "check that it is a complete GGUF file") from e
    size = path.stat().st_size
    tensors = []
    for t in infos:
        if t.offset + t.nbytes > size:
            raise UserError(f"GGUF {path} is truncated (tensor {t.name})", "re-create the file")
        dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}.get(t.qtype, np.uint8)
        count = t.nbytes // np.dtype(dtype).itemsize
        tensors.append(SourceTensor(t.name, t.shape, t.qtype,
                                    lambda p=path, o=t.offset, d=dtype, n=count: _read_at(p, o, d, n)))
    return kvs, tensors


def from_model(g: GGUFModel) -> tuple[list[KV], list[SourceTensor]]:
    """The tensors of a converted Hugging Face model as an F32 source (as if read from its F32 GGUF)."""
    src = [SourceTensor(name, tuple(t.shape), QT.F32, lambda t=t: to_stored(t, QT.F32)) for name, t in g.weights]
    return list(g.kvs), src


def to_float32(src: SourceTensor) -> np.ndarray:
    """The tensor as fp32 rows (dequantized when it is stored quantized)."""
    raw = src.raw()
    if src.qtype == QT.F32:
        return np.asarray(raw, dtype=np.float32).reshape(-1, src.shape[-1])
    if src.qtype == QT.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(-1, src.shape[-1])
    if src.qtype == QT.BF16:
        bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(-1, src.shape[-1])
    n_rows = int(np.prod(src.shape[:-1], dtype=np.int64))
    return np.asarray(dequantize(np.asarray(raw).reshape(n_rows, -1), src.qtype), dtype=np.float32)


def load_weights(model: Any, path: str | Path) -> dict[str, Any]:
    """Copy a GGUF's (de-quantized) weights into a Llama/Qwen2/GPT-2 ``model`` of the same shape; return a summary.

    The inverse of the converter's tensor mapping: GGUF names back to Hugging Face names, q/k rows
    back from ggml's adjacent pairs to the halves layout. Faster than a full ``load_model`` of the file
    when a model of the right architecture is already in memory.
    """
    arch = architecture(model)
    n_head, n_kv = head_counts(model)
    by_name = {t.name: t for t in read_gguf(path)[1]}
    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for hf_name, param in state.items():
            g = gguf_tensor_name(hf_name)
            if g is None or g not in by_name:
                if g == "output.weight" and "token_embd.weight" in by_name:
                    continue  # tied to the embeddings
                raise UserError(f"{path} has no tensor {g} for {hf_name}", "use the GGUF of this model")
            w = torch.from_numpy(to_float32(by_name[g]))
            param.copy_(from_gguf_layout(arch, hf_name, g, w, param.shape, n_head, n_kv).to(param.dtype))
            copied += 1
    return {"tensors": copied}
