"""llama.cpp's quantization presets: which ggml type each tensor gets, and the quantized GGUF file.

Source: ggml-org/llama.cpp ``src/llama-quant.cpp`` (``llama_tensor_get_type``, ``tensor_type_fallback``,
``tensor_allows_quantization``, ``llama_model_quantize_impl``), re-written for the presets below.

A preset (llama.cpp's "file type", ``general.file_type``) names a default tensor type and a few rules
that spend more bits where the error costs most:

* only tensors of 2 or more dimensions whose name ends in ``weight`` are quantized; norms stay F32;
* ``output.weight`` (or ``token_embd.weight`` when the embeddings are tied, since it then serves as the
  output) gets Q6_K, or Q8_0 when its row length is not a multiple of the preset type's block;
* ``attn_v`` (the value projection) and ``ffn_down`` get more bits in some layers: ``use_more_bits(i, n)``
  is true for the first and last eighth of the layers and every third layer between them
  (``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``); Q4_K_M / Q5_K_M give those layers Q6_K; Q3_K_M gives
  the first two ``attn_v`` Q5_K and the first sixteenth of ``ffn_down`` Q5_K; Q2_K gives ``attn_v`` Q3_K
  (Q4_K when a key/value head serves 4 or more query heads) and ``ffn_down`` / ``attn_output`` Q3_K;
* a row whose length is not a multiple of the type's block falls back: Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0;
  Q5_K -> Q5_1; Q6_K -> Q8_0 (32-wide blocks); F16 when even 32 does not divide it. The default model's
  576-wide rows are not multiples of 256, so most of its k-quant tensors fall back.

The file keeps the input's metadata in order, with ``general.quantization_version`` (2) and
``general.file_type`` moved to the end, and its tensors ordered as llama.cpp's loader sorts them
(global tensors first, then by layer, then by name); every tensor starts at a multiple of 32 bytes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import LlamaFileType as FT
from gguf.constants import GGML_QUANT_SIZES

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import FLOAT_TYPES, KV, QUANTIZATION_VERSION, Tensor, save_gguf, to_stored
from llmcourse.quant.gguf.convert import GGUFModel
from llmcourse.quant.gguf.load import SourceTensor, from_model, is_quantized, read_gguf, to_float32
from llmcourse.quant.gguf.quantize import quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A llama.cpp file type: its ``general.file_type`` value and default tensor type."""

    name: str
    ftype: FT
    default: QT
    pure: bool = False  # every quantizable tensor gets ``default`` (llama-quantize --pure)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("Q4_0", FT.MOSTLY_Q4_0, QT.Q4_0),
    Preset("Q4_1", FT.MOSTLY_Q4_1, QT.Q4_1),
    Preset("Q5_0", FT.MOSTLY_Q5_0, QT.Q5_0),
    Preset("Q5_1", FT.MOSTLY_Q5_1, QT.Q5_1),
    Preset("Q8_0", FT.MOSTLY_Q8_0, QT.Q8_0),
    Preset("Q2_K", FT.MOSTLY_Q2_K, QT.Q2_K),
    Preset("Q3_K_S", FT.MOSTLY_Q3_K_S, QT.Q3_K),
    Preset("Q3_K_M", FT.MOSTLY_Q3_K_M, QT.Q3_K),
    Preset("Q3_K_L", FT.MOSTLY_Q3_K_L, QT.Q3_K),
    Preset("Q4_K_S", FT.MOSTLY_Q4_K_S, QT.Q4_K),
    Preset("Q4_K_M", FT.MOSTLY_Q4_K_M, QT.Q4_K),
    Preset("Q5_K_S", FT.MOSTLY_Q5_K_S, QT.Q5_K),
    Preset("Q5_K_M", FT.MOSTLY_Q5_K_M, QT.Q5_K),
    Preset("Q6_K", FT.MOSTLY_Q6_K, QT.Q6_K),
    # one tensor type everywhere (the k-quant names that are not presets): llama-quantize --pure
    Preset("Q3_K", FT.MOSTLY_Q3_K_M, QT.Q3_K, pure=True),
    Preset("Q4_K", FT.MOSTLY_Q4_K_M, QT.Q4_K, pure=True),
    Preset("Q5_K", FT.MOSTLY_Q5_K_M, QT.Q5_K, pure=True),
    Preset("F16", FT.MOSTLY_F16, QT.F16),
    Preset("BF16", FT.MOSTLY_BF16, QT.BF16),
    Preset("F32", FT.ALL_F32, QT.F32),
]}
COURSE_PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
                  "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]

# a row that does not fill whole blocks of the type falls back to a 32-wide type (tensor_type_fallback)
FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def get_preset(name: str, pure: bool = False) -> Preset:
    """The preset called ``name`` (case-insensitive); ``pure`` forces one type everywhere."""
    p = PRESETS.get(name.upper())
    if p is None:
        raise UserError(f"unknown GGUF type {name!r}", f"use one of {', '.join(PRESETS)}")
    if pure and not p.pure:
        p = Preset(p.name, p.ftype, p.default, pure=True)
    return p


def block_size(qtype: QT) -> int:
    """Values per block of ``qtype`` (1 for float types, 32 or 256 for the quantized ones)."""
    return GGML_QUANT_SIZES[qtype][0]


# ---------------------------------------------------------------------------------------------
# Which type each tensor gets (llama_tensor_get_type)
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelShape:
    """What the rules need to know about the model (from the GGUF's hyperparameters)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B, whose attn_v gets Q5_K
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


def allows_quantization(name: str, n_dims: int) -> bool:
    """Whether llama.cpp quantizes this tensor at all (2-D+, a weight, not a norm, not a router...)."""
    if n_dims < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    skip = ("ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "attn_rel_b.weight",
            "time_mix_", "shortconv.conv.weight")
    return not any(s in name for s in skip) and name not in ("position_embd.weight", "token_types.weight")


def category(name: str) -> str:
    """The tensor's role in the rules: output, token_embd, attn_v, attn_k, attn_q, ffn_down, ..."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in [("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")]:
        if key in name:
            return cat
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(qtype: QT, n_per_row: int) -> QT:
    if n_per_row % block_size(qtype) == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    if n_per_row % block_size(new) != 0:
        new = QT.F16
    log.info("row of %d not a multiple of %s's block: falling back to %s", n_per_row, qtype.name, new.name)
    return new


def tensor_types(tensors: list[tuple[str, tuple[int, ...]]], preset: Preset, shape: ModelShape,
                 has_imatrix: bool = False,
                 fallbacks: dict[str, tuple[QT, QT]] | None = None) -> dict[str, QT | None]:
    """The ggml type of each ``(name, torch_shape)`` under ``preset`` (None: keep the tensor as it is).

    ``tensors`` must be in the file's order: the per-layer counters of ``attn_v`` and ``ffn_down``
    follow it, as in llama.cpp. ``fallbacks``, if given, receives ``name -> (the type the preset chose,
    the type used)`` for each tensor whose rows do not fill whole blocks of the chosen type.
    """
    ft = preset.ftype
    n_attention_wv = sum(category(n) in ("attn_v", "attn_qkv") for n, _ in tensors)
    tied = not any(n == "output.weight" for n, _ in tensors)
    i_wv = i_down = 0
    arch_falcon = shape.arch == "falcon"
    out: dict[str, QT | None] = {}
    for name, tshape in tensors:
        if not allows_quantization(name, len(tshape)):
            out[name] = None
            continue
        new = preset.default
        if not is_quantized(new):
            out[name] = new
            continue
        cat = category(name)
        n_per_row = tshape[-1]
        if not preset.pure:
            if cat == "output" or (tied and cat == "token_embd"):
                if arch_falcon or n_per_row % block_size(new) != 0:
                    if fallbacks is not None and not arch_falcon and new != QT.Q8_0:
                        fallbacks[name] = (QT.Q6_K, QT.Q8_0)
                    new = QT.Q8_0
                elif new != QT.Q8_0:
                    new = QT.Q6_K
            elif cat == "token_embd":
                pass
            elif cat in ("attn_v", "attn_qkv"):  # llama.cpp's category_is_attn_v covers fused qkv too
                if ft == FT.MOSTLY_Q2_K:
                    new = QT.Q4_K if shape.n_gqa >= 4 else QT.Q3_K
                elif ft == FT.MOSTLY_Q3_K_M:
                    new = QT.Q5_K if i_wv < 2 else QT.Q4_K
                elif ft == FT.MOSTLY_Q3_K_L:
                    new = QT.Q5_K
                elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(i_wv, n_attention_wv):
                    new = QT.Q6_K
                elif ft == FT.MOSTLY_Q4_K_S and i_wv < 4:
                    new = QT.Q5_K
                if shape.is_70b and new in (QT.Q3_K, QT.Q4_K):
                    new = QT.Q5_K
                if shape.n_expert == 8:
                    new = QT.Q8_0
                i_wv += 1
            elif cat == "attn_k":
                if shape.n_expert == 8:
                    new = QT.Q8_0
            elif cat == "ffn_down":
                i, n = i_down, shape.n_layer
                if shape.n_expert > 1:
                    m = re.match(r"blk\.(\d+)\.", name)
                    i = int(m.group(1)) if m else i
                if ft == FT.MOSTLY_Q2_K:
                    new = QT.Q3_K
                elif ft == FT.MOSTLY_Q3_K_M:
                    new = (QT.Q5_K if i < n // 16 else
                           QT.Q4_K if not arch_falcon or use_more_bits(i, n) else QT.Q3_K)
                elif ft == FT.MOSTLY_Q3_K_L:
                    new = QT.Q4_K if arch_falcon else QT.Q5_K
                elif ft == FT.MOSTLY_Q4_K_M:
                    if arch_falcon:
                        new = QT.Q6_K if i < n // 16 else QT.Q5_K if use_more_bits(i, n) else QT.Q4_K
                    elif use_more_bits(i, n):
                        new = QT.Q6_K
                elif ft == FT.MOSTLY_Q5_K_M and use_more_bits(i, n):
                    new = QT.Q6_K
                elif ft == FT.MOSTLY_Q4_K_S and not arch_falcon and i < n // 8:
                    new = QT.Q5_K
                elif ft in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and has_imatrix and i < n // 8:
                    # with an imatrix, the first ffn_down layers get the offset variant (Q4_1 / Q5_1)
                    new = QT.Q4_1 if ft == FT.MOSTLY_Q4_0 else QT.Q5_1
                i_down += 1
            elif cat == "attn_output":
                if not arch_falcon:
                    if shape.n_expert == 8:
                        if ft in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M):
                            new = QT.Q5_K
                    elif ft == FT.MOSTLY_Q2_K:
                        new = QT.Q3_K
                    elif ft == FT.MOSTLY_Q3_K_M:
                        new = QT.Q4_K
                    elif ft == FT.MOSTLY_Q3_K_L:
                        new = QT.Q5_K
                elif ft == FT.MOSTLY_Q3_K_L:
                    new = QT.Q4_K
        out[name] = _fallback(new, n_per_row)
        if fallbacks is not None and out[name] != new:
            fallbacks[name] = (new, out[name])
    return out


def bits(qtype: QT) -> float:
    """Bits per weight of ``qtype`` (its block's bytes over its block's weights)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block


def fallback_note(info: dict[str, Any]) -> str:
    """One sentence on why a preset's bits/weight is what it is, when block fallbacks raised it."""
    fb = info.get("fallbacks") or {}
    if not fb.get("tensors"):
        return ""
    pairs = ", ".join(f"{k} x{v}" for k, v in fb["pairs"].items())
    widths = " or ".join(str(w) for w in fb["row_widths"])
    return (f"{info['preset']}: {info['bits_per_weight']:.3f} bits/w rather than {fb['bits_per_weight_without']:.3f}: "
            f"{fb['tensors']} of {info['tensors']} tensors ({fb['weight_share']:.0%} of the weights) have rows of "
            f"{widths} inputs, not a multiple of the K types' 256-wide super-blocks, so llama.cpp stores them in a "
            f"32-wide type with more bits ({pairs})")


# ---------------------------------------------------------------------------------------------
# The quantized file
# ---------------------------------------------------------------------------------------------

def layer_order_key(name: str) -> tuple[int, str]:
    """llama.cpp's loader order: global tensors (layer -1) first, then by layer number, then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def model_shape(kvs: list[KV]) -> ModelShape:
    """Layers, heads and experts from a GGUF's ``{arch}.*`` keys."""
    d = {kv.key: kv.value for kv in kvs}
    arch = d.get("general.architecture")
    if not isinstance(arch, str) or f"{arch}.block_count" not in d:
        raise UserError("the GGUF has no architecture / block count", "re-convert the model with `convert gguf`")
    n_head = d.get(f"{arch}.attention.head_count", 0)
    n_head = int(n_head[0] if isinstance(n_head, list) else n_head)
    n_kv = d.get(f"{arch}.attention.head_count_kv", n_head)
    n_kv = int(n_kv[0] if isinstance(n_kv, list) else n_kv)
    return ModelShape(arch, int(d[f"{arch}.block_count"]), n_head, n_kv, int(d.get(f"{arch}.expert_count", 0)))


def quantize_rows(data: np.ndarray, qtype: QT, imatrix: np.ndarray | None) -> np.ndarray:
    """fp32 rows -> the bytes of ``qtype`` (float types converted, quantized types through our kernels)."""
    if qtype in FLOAT_TYPES:
        return to_stored(torch.from_numpy(data), qtype)
    return quantize(data, qtype, imatrix=imatrix)


def _finite(name: str, rows: np.ndarray) -> np.ndarray:
    """``rows`` if every value is finite; a NaN or infinite weight is refused, naming the tensor (it would
    quantize to a model that evaluates to NaN)."""
    if not np.isfinite(rows).all():
        raise UserError(f"the tensor {name} holds NaN or infinite values", "the weights are corrupt: re-convert the model")
    return rows


def _finite_raw(t: SourceTensor) -> np.ndarray:
    """The stored array of a tensor kept in its type, checked for NaN/infinity when it is a float type."""
    raw = t.raw()
    if t.qtype in FLOAT_TYPES:
        _finite(t.name, to_float32(SourceTensor(t.name, t.shape, t.qtype, lambda: raw)))
    return raw


def quantized_file(kvs: list[KV], src: list[SourceTensor], preset: Preset,
                   imatrix: dict[str, np.ndarray] | None = None) -> tuple[list[KV], list[Tensor], dict[str, Any]]:
    """The metadata and (lazy) tensors of ``src`` quantized with ``preset``, as llama.cpp writes them."""
    shape = model_shape(kvs)
    src = sorted(src, key=lambda t: layer_order_key(t.name))
    fallbacks: dict[str, tuple[QT, QT]] = {}
    types = tensor_types([(t.name, t.shape) for t in src], preset, shape, has_imatrix=imatrix is not None,
                         fallbacks=fallbacks)
    drop = {"general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count"}
    out_kvs = [kv for kv in kvs if kv.key not in drop]
    out_kvs += [KV("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32),
                KV("general.file_type", int(preset.ftype), VT.UINT32)]
    tensors = []
    for t in src:
        new = types[t.name] or t.qtype
        if new == t.qtype:
            tensors.append(Tensor(t.name, t.shape, new, lambda t=t: _finite_raw(t)))
            continue
        im = None
        if imatrix is not None and is_quantized(new):
            im = imatrix.get(t.name)
            if im is not None and im.size != t.shape[-1]:
                if t.name != "token_embd.weight":
                    raise UserError(f"the importance matrix of {t.name} has {im.size} values, the rows {t.shape[-1]}",
                                    "compute the imatrix on this model")
                im = None
        tensors.append(Tensor(t.name, t.shape, new,
                              lambda t=t, new=new, im=im: quantize_rows(_finite(t.name, to_float32(t)), new, im)))
    n_el = sum(int(np.prod(t.shape)) for t in src)
    n_bytes = sum(t.nbytes for t in tensors)
    info = {"preset": preset.name, "file_type": int(preset.ftype), "tensors": len(tensors),
            "types": {k.name: sum(1 for t in tensors if t.qtype == k) for k in sorted({t.qtype for t in tensors})},
            "tensor_bytes": n_bytes, "bits_per_weight": 8 * n_bytes / n_el}
    if fallbacks:  # what the preset chose and could not use: why bits/weight is higher than its name says
        size = {t.name: int(np.prod(t.shape)) for t in src}
        saved = sum(size[n] * (bits(a) - bits(b)) for n, (a, b) in fallbacks.items()) / 8
        pairs: dict[str, int] = {}
        for a, b in fallbacks.values():
            pairs[f"{a.name} -> {b.name}"] = pairs.get(f"{a.name} -> {b.name}", 0) + 1
        info["fallbacks"] = {
            "tensors": len(fallbacks), "pairs": pairs,
            "row_widths": sorted({next(t.shape[-1] for t in src if t.name == n) for n in fallbacks}),
            "weight_share": sum(size[n] for n in fallbacks) / n_el,
            "bits_per_weight_without": 8 * (n_bytes + saved) / n_el,
        }
    return out_kvs, tensors, info


def quantize_gguf(src: str | Path | GGUFModel, out: str | Path, preset: str | Preset,
                  imatrix: dict[str, np.ndarray] | None = None, pure: bool = False,
                  progress: Callable[[Tensor], None] | None = None) -> dict[str, Any]:
    """Quantize a GGUF file (or a converted model) with a llama.cpp preset into ``out``; return a summary.

    From an F32/F16/BF16 GGUF the result has llama.cpp's tensor types and bytes. A source that is
    already quantized is de-quantized first (llama.cpp refuses unless ``--allow-requantize``).
    """
    p = preset if isinstance(preset, Preset) else get_preset(preset, pure)
    kvs, src = from_model(src) if isinstance(src, GGUFModel) else read_gguf(src)
    requant = sorted({t.qtype.name for t in src if is_quantized(t.qtype)})
    if requant:
        log.warning("re-quantizing tensors stored as %s: the result carries both roundings", ", ".join(requant))
    out_kvs, tensors, info = quantized_file(kvs, src, p, imatrix)
    t0 = time.perf_counter()
    size = save_gguf(out, out_kvs, tensors, progress)
    info.update(out=str(out), bytes=size, seconds=time.perf_counter() - t0, requantized_from=requant or None)
    return info
