"""Importance matrix: mean squared activation per input column of every linear layer.

Source: llama.cpp ``tools/imatrix/imatrix.cpp`` (``IMatrixCollector``, PR #4861 by Kawrakow) and
``common/imatrix-loader.cpp``; quantizers use it in ``ggml-quants.c`` (see ``searches.py``).

For a linear layer ``y = W x`` the quantization error of column j of ``W`` reaches the output
through ``x_j``, so the expected error is ``sum_j E[x_j^2] * err_j^2``. The importance matrix
stores, per weight tensor, the sum of ``x_j^2`` over all calibration tokens (``in_sum2``) and
the number of tokens (``counts``); llama-quantize passes ``in_sum2 / counts`` to the quantizers
as ``quant_weights`` (one float per column).

Files. llama.cpp (as in llama-cpp-python 0.3.36) writes GGUF by default: ``general.type =
"imatrix"``, ``imatrix.datasets`` (strings), ``imatrix.chunk_count``, ``imatrix.chunk_size``, and
per weight two F32 tensors ``<name>.in_sum2`` (ne = [n_in, n_mat]) and ``<name>.counts``
(ne = [1, n_mat]), sorted by name. The legacy ``.dat`` format (``--output-format dat``) holds, per
entry, the name, ``ncall`` = ceil(count / chunk_size) and ``in_sum2 / count * ncall``, then the
chunk count and the dataset name; the loader divides by ``ncall``. Both are read and written here.

Collection. llama.cpp hooks every matrix multiplication whose weight is named ``blk.*`` (and
``output.weight`` only with ``--process-output``) on its own forward; we register forward hooks
on the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules of a transformers model (``core.modules``'
``linear_layers`` / ``input_hooks``) and name them with the converter's GGUF tensor names, over
calibration windows of ``chunk_size`` tokens.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, Tensor, check_tensor_data, read_gguf_header, save_gguf
from llmcourse.core.io import atomic_file
from llmcourse.core.modules import input_hooks, linear_layers
from llmcourse.quant.gguf.names import mapped_name

log = logging.getLogger(__name__)

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"

def module_tensor_name(module_name: str) -> str | None:
    """llama.cpp's name of the weight of a transformers linear module (``blk.3.ffn_down.weight``),
    or None for modules llama.cpp's converter does not map (the converter's table, :mod:`.names`)."""
    return mapped_name(f"{module_name}.weight")


@dataclass
class ImatrixEntry:
    """Statistics of one weight: ``in_sum2`` (n_mat, n_in) sums of x^2, ``counts`` (n_mat,) tokens."""

    in_sum2: np.ndarray
    counts: np.ndarray

    def values(self) -> np.ndarray:
        """What llama-quantize hands to the quantizers: in_sum2 / count per matrix (1 where the
        count is 0), float32, flattened (n_mat * n_in,)."""
        s = self.in_sum2.astype(np.float32)
        c = self.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(c > 0, s / c, np.float32(1))
        return v.reshape(-1).astype(np.float32)


@dataclass
class Imatrix:
    """An importance matrix: entries by GGUF tensor name, and where it came from."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self, name: str) -> np.ndarray | None:
        """The per-column weights for tensor ``name`` (see :meth:`ImatrixEntry.values`), or None."""
        e = self.entries.get(name)
        return None if e is None else e.values()

    def quant_weights(self) -> dict[str, np.ndarray]:
        """All entries as llama-quantize's ``name -> values`` map."""
        return {k: e.values() for k, e in sorted(self.entries.items())}


# ----------------------------------------------------------------------------- collection

def _linear_modules(model: torch.nn.Module, process_output: bool) -> dict[str, torch.nn.Module]:
    """GGUF tensor name -> linear module (``core.modules.linear_layers``) for every layer llama.cpp hooks."""
    out = {}
    for mname, mod in linear_layers(model):
        gname = module_tensor_name(mname)
        if gname is None or (gname == "output.weight" and not process_output):
            continue
        out[gname] = mod
    return out


@torch.no_grad()
def collect(model: torch.nn.Module, windows: torch.Tensor | Iterable[torch.Tensor], *,
            process_output: bool = False, dataset: str = "",
            progress: Callable[[Iterable], Iterable] | None = None) -> Imatrix:
    """Run ``model`` over token ``windows`` (n, chunk_size) and accumulate sum x^2 per input column.

    Every window is one llama.cpp "chunk" evaluated on its own. ``process_output`` also collects
    the output projection (llama-imatrix's ``--process-output``). Sums are accumulated in float64
    and stored as float32 (llama.cpp accumulates in float32; the difference is rounding).
    """
    mods = _linear_modules(model, process_output)
    if not mods:
        raise UserError("the model has no linear layers with llama.cpp names (Llama/Qwen2/GPT-2 family)",
                        "use a Llama, Qwen2 or GPT-2 style model")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(gname: str, x: torch.Tensor) -> None:  # x: (tokens, n_in)
        x = x.to(torch.float64)
        s = (x * x).sum(dim=0)
        sums[gname] = sums[gname] + s if gname in sums else s
        counts[gname] = counts.get(gname, 0) + x.shape[0]

    n_chunks, chunk_size = 0, 0
    with input_hooks(mods, accumulate):
        it = windows if progress is None else progress(windows)
        for w in it:
            ids = torch.as_tensor(w).reshape(1, -1).to(next(model.parameters()).device)
            chunk_size = max(chunk_size, ids.shape[1])
            model(input_ids=ids)
            n_chunks += 1
    entries = {g: ImatrixEntry(sums[g].to(torch.float32).numpy()[None, :].copy(),
                               np.array([counts[g]], dtype=np.int64)) for g in sorted(sums)}
    log.info("imatrix: %d entries from %d chunks of %d tokens", len(entries), n_chunks, chunk_size)
    return Imatrix(entries, [dataset] if dataset else [], n_chunks, chunk_size)


# ----------------------------------------------------------------------------- files

def save(imatrix: Imatrix, path: str | Path, legacy: bool = False) -> None:
    """Write ``imatrix`` as llama.cpp's GGUF imatrix (default) or legacy ``.dat`` file, atomically."""
    if legacy:
        data = _dat_bytes(imatrix)
        with atomic_file(path) as f:
            f.write(data)
        return
    kvs = [KV("general.type", "imatrix", VT.STRING)]  # llama-imatrix writes no architecture
    if imatrix.datasets:  # gguf-py's writer leaves an empty array out
        kvs.append(KV(KV_DATASETS, list(imatrix.datasets), VT.ARRAY, VT.STRING))
    kvs += [KV(KV_CHUNK_COUNT, int(imatrix.chunk_count), VT.UINT32),
            KV(KV_CHUNK_SIZE, int(imatrix.chunk_size), VT.UINT32)]
    tensors = []
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        n_mat = len(e.counts)
        s = np.ascontiguousarray(e.in_sum2, dtype=np.float32).reshape(n_mat, -1)
        c = np.asarray(e.counts, dtype=np.float32).reshape(n_mat, 1)
        tensors += [Tensor(f"{name}.in_sum2", s.shape, QT.F32, lambda s=s: s),
                    Tensor(f"{name}.counts", c.shape, QT.F32, lambda c=c: c)]
    save_gguf(path, kvs, tensors)


def _dat_bytes(imatrix: Imatrix) -> bytes:
    chunk = max(1, int(imatrix.chunk_size))
    out = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        nb = name.encode()
        counts = np.asarray(e.counts, dtype=np.int64)
        ncall = int((counts.max() + chunk - 1) // chunk)
        s = np.asarray(e.in_sum2, dtype=np.float32).reshape(len(counts), -1)
        c = counts.astype(np.float32)[:, None]
        value = np.where(c == 0, np.float32(1), s)
        c = np.where(c == 0, np.float32(1), c)
        tmp = ((value / c) * np.float32(ncall)).astype(np.float32).reshape(-1)
        out += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", ncall, tmp.size), tmp.tobytes()]
    ds = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out += [struct.pack("<i", int(imatrix.chunk_count)), struct.pack("<i", len(ds)), ds]
    return b"".join(out)


def load(path: str | Path) -> Imatrix:
    """Read a llama.cpp importance matrix, GGUF or legacy ``.dat`` (told apart by the GGUF magic)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"imatrix file {p} does not exist", "pass the path of an imatrix .gguf or .dat file")
    with open(p, "rb") as f:
        magic = f.read(4)
    try:
        return _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    except (ValueError, struct.error, IndexError, KeyError) as e:
        raise UserError(f"{p} is not a readable imatrix file ({e})", "recompute it with `llmcourse imatrix`") from None


def _load_gguf(p: Path) -> Imatrix:
    kvs, infos = read_gguf_header(p)
    check_tensor_data(infos, p.stat().st_size)
    meta = {kv.key: kv.value for kv in kvs}
    im = Imatrix(datasets=[str(d) for d in meta.get(KV_DATASETS, [])],
                 chunk_count=int(meta.get(KV_CHUNK_COUNT, 0)), chunk_size=int(meta.get(KV_CHUNK_SIZE, 0)))
    sums: dict[str, np.ndarray] = {}
    cnts: dict[str, np.ndarray] = {}
    other = [t.name for t in infos if not t.name.endswith((".in_sum2", ".counts"))]
    if other or not infos:  # a model GGUF (token_embd.weight...) or an empty file is no importance matrix
        raise ValueError(f"it holds no importance matrix (e.g. the tensor {other[0]})" if other
                         else "it holds no tensors")
    with open(p, "rb") as f:
        for t in infos:
            if t.qtype != QT.F32:
                raise ValueError(f"tensor {t.name} is not F32")
            f.seek(t.offset)
            a = np.fromfile(f, dtype="<f4", count=t.nbytes // 4).reshape(-1, t.shape[-1])  # (n_mat, n)
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = a
            elif t.name.endswith(".counts"):
                cnts[t.name[: -len(".counts")]] = np.floor(a.reshape(-1) + 0.5).astype(np.int64)  # std::lround
    if set(sums) != set(cnts):
        raise ValueError("mismatched in_sum2 and counts tensors")
    for name in sorted(sums):
        im.entries[name] = ImatrixEntry(sums[name].reshape(len(cnts[name]), -1), cnts[name])
    return im


def _load_dat(p: Path) -> Imatrix:
    buf = p.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        v = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return v

    (n,) = take("<i")
    if n < 1:
        raise ValueError("no entries")
    im = Imatrix()
    for _ in range(n):
        (ln,) = take("<i")
        name = buf[off:off + ln].decode()
        off += ln
        ncall, nval = take("<ii")
        if nval < 1:
            raise ValueError(f"entry {name} has no values")
        vals = np.frombuffer(buf, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
        # the file stores in_sum2 / count * ncall; keep it as sums over ncall "tokens"
        # the file stores in_sum2 / count * ncall: as sums over ncall "tokens" the division gives
        # back llama.cpp's values (with ncall 0 the loader takes the values as they are)
        im.entries[name] = ImatrixEntry(vals[None, :].copy(), np.array([max(ncall, 1)], dtype=np.int64))
    if off < len(buf):
        (im.chunk_count,) = take("<i")
        if off < len(buf):
            (ln,) = take("<i")
            if ln > 0:
                im.datasets = [buf[off:off + ln].decode(errors="replace")]
    return im

