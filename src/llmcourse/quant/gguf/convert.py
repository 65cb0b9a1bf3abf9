"""Hugging Face causal LM -> GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Source: ggml-org/llama.cpp ``convert_hf_to_gguf.py`` (``conversion/base.py``, ``llama.py``, ``qwen.py``,
``gpt2.py``) and ``gguf-py/gguf/vocab.py`` (``SpecialVocab``), read and re-written here for the Llama
family, Qwen2 and GPT-2.

A GGUF file (version 3, little endian) is::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)            string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, ne[0..n_dims) u64, type: u32, offset: u64)
    zero padding to ``general.alignment`` (32)
    tensor data, each tensor starting at a multiple of the alignment

``ne[0]`` is the fastest-varying dimension, so a torch weight of shape ``(out, in)`` is stored as
``ne = [in, out]``: rows of ``n_per_row = in`` values, which is what the quantizers work on.

What the converter does to the weights:

* names: ``model.layers.{i}.self_attn.q_proj.weight`` -> ``blk.{i}.attn_q.weight`` and so on
  (:data:`TENSOR_NAMES`, :data:`GPT2_NAMES`); ``lm_head.weight`` -> ``output.weight``, left out when the
  embeddings are tied; GPT-2's Conv1D weights, stored (in, out), are transposed to (out, in);
* Llama's q/k permutation: Hugging Face's rotary embedding rotates the two *halves* of each head
  (``rotate_half``), ggml's ``rope`` (normal mode) rotates *adjacent pairs*. Within each head the rows
  ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` are reordered to ``[x_0, y_0, x_1, y_1, ...]`` (for k, with
  the number of key/value heads), so the same rotation is applied to the same pairs. Qwen2 keeps the
  halves layout (llama.cpp runs it with NEOX rope), so it is not permuted;
* dtype: 1-D tensors, norms and position embeddings stay F32; the other weights become the output type
  (F32, F16 or BF16, round to nearest even).

Metadata, in llama.cpp's order: ``general.*`` (name, basename, finetune, size label through
``gguf.Metadata``, the model-naming heuristics the reference converter uses), the architecture's
hyperparameters (``{arch}.block_count`` ... ``general.file_type``), then the tokenizer (GPT-2 style BPE:
``tokenizer.ggml.model = "gpt2"``, the pre-tokenizer name, tokens, token types, merges, special token
ids, ``add_bos_token``/``add_eos_token`` and the chat template).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import LlamaFileType, TokenType

from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_file

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

OUT_TYPES = {"f32": (QT.F32, LlamaFileType.ALL_F32), "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
             "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16)}

# Hugging Face architecture -> GGUF architecture name
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2"}

# per-layer Hugging Face module -> GGUF tensor (llama and qwen2 share these)
TENSOR_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
# GPT-2 (transformer.h.{i}.*): its Conv1D layers store (in, out) weights, transposed on the way
GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---------------------------------------------------------------------------------------------
# The file: key/value pairs, tensor infos, aligned data
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
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    n_per_row = shape[-1]
    if n_per_row % block:
        raise ValueError(f"row of {n_per_row} is not a multiple of {qtype.name}'s block {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (n_per_row // block) * type_size


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
    align = next((int(kv.value) for kv in kvs if kv.key == "general.alignment"), ALIGNMENT)
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
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm)
        if bytes(mm[:4]) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        c.pos = 4
        version, n_tensors, n_kv = c.take("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        if n_kv > len(mm) or n_tensors > len(mm):
            raise ValueError("implausible key or tensor count")
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
            qtype, offset = c.take("<IQ")
            infos.append(TensorInfo(name, tuple(int(x) for x in reversed(ne)), QT(qtype), offset))
        align = next((int(kv.value) for kv in kvs if kv.key == "general.alignment"), ALIGNMENT)
        start = _pad(c.pos, align)
    for t in infos:
        t.offset += start
    return kvs, infos


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF's halves ``[x.., y..]`` to ggml's pairs ``[x0, y0, x1, y1, ...]``.

    ``w`` is (n_head * head_dim, ...) (a q/k weight or bias). For each head, row ``j`` of the first
    half and row ``j`` of the second half become rows ``2j`` and ``2j + 1``.
    """
    head_dim = w.shape[0] // n_head
    heads = w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])  # (n_head, half, head_dim/2, ...)
    return heads.transpose(1, 2).reshape(w.shape)  # (n_head, head_dim/2, half, ...) flattened


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope` (GGUF -> Hugging Face)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face parameter of a Llama/Qwen2 model (None: not written)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        module = ".".join(parts[3:])
        if module in TENSOR_NAMES:
            return f"blk.{int(parts[2])}.{TENSOR_NAMES[module]}.{suffix}"
    if len(parts) >= 4 and parts[0] == "transformer" and parts[1] == "h" and parts[2].isdecimal():
        module = ".".join(parts[3:])
        if module in GPT2_NAMES:
            return f"blk.{int(parts[2])}.{GPT2_NAMES[module]}.{suffix}"
        if module in ("attn", "attn.masked") or hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # GPT-2's causal-mask buffers
    if stem.endswith("rotary_emb"):
        return None
    raise UserError(f"cannot map the tensor {hf_name!r} to a GGUF name",
                    "only Llama-family, Qwen2 and GPT-2 models are supported by `convert gguf`")


def architecture(model: Any) -> str:
    """The GGUF architecture (``llama``/``qwen2``) of a Hugging Face model."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    hf_arch = archs[0]
    if hf_arch not in ARCHITECTURES:
        raise UserError(f"{hf_arch} cannot be converted to GGUF here",
                        f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[hf_arch]


def _is_tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is None or head.weight.data_ptr() == emb.weight.data_ptr() or bool(
        getattr(model.config, "tie_word_embeddings", False))


def hf_weights(model: Any) -> list[tuple[str, torch.Tensor]]:
    """``(gguf_name, fp32 tensor)`` of a Llama/Qwen2 model, in the order the reference writes them.

    The reference converter walks a safetensors file, whose keys are sorted, so tensors follow the
    sorted Hugging Face names (``model.layers.10`` before ``model.layers.2``).
    """
    arch = architecture(model)
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tied = _is_tied(model)
    out = []
    for hf_name, t in sorted(model.state_dict().items()):
        if tied and hf_name.startswith("lm_head."):
            continue
        name = gguf_tensor_name(hf_name)
        if name is None:
            continue
        t = t.detach().to(torch.float32)
        if arch == "gpt2" and hf_name.endswith(GPT2_CONV1D):
            t = t.t().contiguous()  # Conv1D (in, out) -> (out, in)
        if arch == "llama":
            if ".attn_q." in name:
                t = permute_rope(t, n_head)
            elif ".attn_k." in name:
                t = permute_rope(t, n_kv)
        out.append((name, t))
    return out


def stored_type(name: str, n_dims: int, outtype: QT) -> QT:
    """The type a converted tensor is stored in: F32 for 1-D tensors and norms, else ``outtype``."""
    if (n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name in ("position_embd.weight", "token_types.weight")):
        return QT.F32
    return outtype


def to_stored(t: torch.Tensor, qtype: QT) -> np.ndarray:
    """fp32 torch tensor -> the numpy array GGUF stores for ``qtype`` (F32, F16 or BF16 bits)."""
    if qtype == QT.F32:
        return t.contiguous().numpy()
    if qtype == QT.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == QT.BF16:  # round to nearest even, as gguf-py and ggml's fp32 -> bf16
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"not a float type: {qtype.name}")


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def _u32(key: str, v: int) -> KV:
    return KV(key, int(v), VT.UINT32)


def _f32(key: str, v: float) -> KV:
    return KV(key, float(v), VT.FLOAT32)


def _str(key: str, v: str) -> KV:
    return KV(key, v, VT.STRING)


def general_metadata(name: str | None, n_params: int, folder: Path | None = None) -> list[KV]:
    """``general.type`` and the naming keys (name, finetune, basename, size label...).

    Uses ``gguf.Metadata`` (the reference converter's naming heuristics, from ``gguf-py``): a model
    folder's name ``SmolLM2-135M-Instruct`` gives name "SmolLM2 135M Instruct", basename "SmolLM2",
    finetune "Instruct", size label "135M".
    """
    import gguf

    meta = gguf.Metadata.load(None, folder if folder is not None and folder.is_dir() else None, name, n_params)
    if meta.name is None:
        meta.name = folder.name if folder is not None else name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    out = [_str("general.type", "model")]
    fields = [("name", meta.name), ("author", meta.author), ("version", meta.version),
              ("organization", meta.organization), ("finetune", meta.finetune), ("basename", meta.basename),
              ("description", meta.description), ("quantized_by", meta.quantized_by),
              ("size_label", meta.size_label), ("license", meta.license), ("license.name", meta.license_name),
              ("license.link", meta.license_link), ("url", meta.url), ("doi", meta.doi), ("uuid", meta.uuid),
              ("repo_url", meta.repo_url)]
    out += [_str(f"general.{k}", v) for k, v in fields if v]
    return out


def hparams_metadata(model: Any, arch: str, file_type: int) -> list[KV]:
    """The hyperparameter keys llama.cpp's converter writes for ``arch`` (llama, qwen2, gpt2)."""
    cfg = model.config
    c = cfg.to_dict()
    if arch == "gpt2":
        # the reference reads n_ctx, which configs saved by recent transformers no longer carry
        return [_u32("gpt2.block_count", c["n_layer"]), _u32("gpt2.context_length", c.get("n_ctx") or c["n_positions"]),
                _u32("gpt2.embedding_length", c["n_embd"]), _u32("gpt2.feed_forward_length", c.get("n_inner") or 4 * c["n_embd"]),
                _u32("gpt2.attention.head_count", c["n_head"]),
                _f32("gpt2.attention.layer_norm_epsilon", c["layer_norm_epsilon"]),
                _u32("general.file_type", file_type)]
    out = [_u32(f"{arch}.block_count", c["num_hidden_layers"])]
    for key, names in [("context_length", ["max_position_embeddings"]), ("embedding_length", ["hidden_size"]),
                       ("feed_forward_length", ["intermediate_size"]),
                       ("attention.head_count", ["num_attention_heads"]),
                       ("attention.head_count_kv", ["num_key_value_heads"])]:
        v = next((c[n] for n in names if c.get(n) is not None), None)
        if v is not None:
            out.append(_u32(f"{arch}.{key}", v))
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if "rope_theta" not in rope and c.get("rope_theta") is not None:
        rope = {**rope, "rope_theta": c["rope_theta"]}
    rope_type = rope.get("rope_type", rope.get("type"))
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        out += [_str(f"{arch}.rope.scaling.type", "linear"), _f32(f"{arch}.rope.scaling.factor", factor)]
    elif rope_type == "yarn" and factor is not None:
        out += [_str(f"{arch}.rope.scaling.type", "yarn"), _f32(f"{arch}.rope.scaling.factor", factor),
                _u32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])]
    elif rope_type not in (None, "default", "llama3"):
        raise UserError(f"rope type {rope_type!r} is not supported by `convert gguf`", "use a model with plain RoPE")
    if rope.get("rope_theta") is not None:
        out.append(_f32(f"{arch}.rope.freq_base", rope["rope_theta"]))
    if c.get("rms_norm_eps") is not None:
        out.append(_f32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        out += [_u32(f"{arch}.attention.key_length", c["head_dim"]),
                _u32(f"{arch}.attention.value_length", c["head_dim"])]
    out.append(_u32("general.file_type", file_type))
    if arch == "llama":
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        out += [_u32(f"{arch}.vocab_size", c["vocab_size"]), _u32(f"{arch}.rope.dimension_count", head_dim)]
    if rope_type == "llama3":
        raise UserError("Llama 3.1 RoPE scaling (rope_freqs) is not supported by `convert gguf`",
                        "use a model with plain RoPE")
    return out


# The reference converter recognises a BPE pre-tokenizer by the sha256 of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); llama.cpp then applies its own regexes for that name.
PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# hash -> llama.cpp pre-tokenizer name, for the tokenizers of the models this converter supports
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer (``tokenizer.ggml.pre``)."""
    ids = tokenizer.encode(PRE_CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise UserError(f"unknown BPE pre-tokenizer (hash {digest[:12]}...)",
                        "pass pre_tokenizer='NAME' (llama.cpp's tokenizer.ggml.pre, e.g. 'llama-bpe', 'qwen2', 'smollm')")
    return KNOWN_PRE_TOKENIZERS[digest]


def _looks_special(token: str) -> bool:
    # added tokens some models forget to flag as special (as does_token_look_special)
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types (NORMAL, CONTROL, USER_DEFINED, UNUSED) for ids < vocab_size."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows",
                        "use the tokenizer that belongs to the model")
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tok = by_id[i]
        if tok in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or _looks_special(tok):
                types.append(TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(tok)
    return tokens, [int(t) for t in types]


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer",
                        "convert models whose tokenizer has a tokenizer.json")
    return json.loads(backend.to_str())


def _merges(tj: dict) -> list[str]:
    merges = tj.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):  # [a, b] pairs; a space inside a part is written as U+0120
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                 "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}


def special_tokens(tokenizer: Any, config: Any, tj: dict, vocab_size: int) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add-bos/add-eos flags, found as gguf-py's ``SpecialVocab`` finds them.

    Ids: the tokenizer's ``{type}_token`` looked up among its added tokens, else the model config's
    ``{type}_token_id``. Flags: the tokenizer's post-processor (``ByteLevel``: neither; a template
    ``[BOS] $A [EOS]``: the tokens it adds), else the tokenizer's ``add_bos_token``/``add_eos_token``.
    """
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    ids: dict[str, int] = {}

    def set_id(typ: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size and typ not in ids:
            ids[typ] = tid

    for typ in SPECIAL_TYPES:
        tok = getattr(tokenizer, f"{typ}_token", None)
        if isinstance(tok, str) and tok in added:
            set_id(typ, added[tok])
    for typ in SPECIAL_TYPES:
        set_id(typ, getattr(config, f"{typ}_token_id", None))
    flags: dict[str, bool] = {}
    pp = tj.get("post_processor") or {}
    for proc in pp.get("processors", [pp]) if pp else []:
        if proc.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single", [])
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                if first:
                    flags["bos"] = first == getattr(tokenizer, "bos_token", None)
                if last:
                    flags["eos"] = last == getattr(tokenizer, "eos_token", None)
    for typ in SPECIAL_TYPES:
        v = getattr(tokenizer, "init_kwargs", {}).get(f"add_{typ}_token")
        if isinstance(v, bool) and typ not in flags:
            flags[typ] = v
    return ids, flags


def tokenizer_metadata(tokenizer: Any, config: Any, vocab_size: int, arch: str,
                       pre_tokenizer: str | None = None) -> list[KV]:
    """The ``tokenizer.*`` keys of a GPT-2 style BPE tokenizer, as the reference converter writes them."""
    tj = _tokenizer_json(tokenizer)
    if tj.get("model", {}).get("type") != "BPE":
        raise UserError("only BPE (tokenizer.json) tokenizers are supported by `convert gguf`",
                        "use a model with a GPT-2 style byte-level BPE tokenizer")
    out: list[KV] = []
    add_prefix = getattr(tokenizer, "init_kwargs", {}).get("add_prefix_space")
    if arch == "llama" and isinstance(add_prefix, bool):
        out.append(KV("tokenizer.ggml.add_space_prefix", add_prefix, VT.BOOL))
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    out += [_str("tokenizer.ggml.model", "gpt2"),
            _str("tokenizer.ggml.pre", pre_tokenizer or pre_tokenizer_name(tokenizer)),
            KV("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
            KV("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)]
    merges = _merges(tj)
    if merges:
        out.append(KV("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING))
    ids, flags = special_tokens(tokenizer, config, tj, vocab_size)
    out += [_u32(f"tokenizer.ggml.{_SPECIAL_KEYS[typ]}", tid) for typ, tid in ids.items()]
    out += [KV(f"tokenizer.ggml.add_{typ}_token", v, VT.BOOL) for typ, v in flags.items()
            if typ in ("bos", "eos", "sep")]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        out.append(_str("tokenizer.chat_template", template.get("default", next(iter(template.values())))))
        out += [_str(f"tokenizer.chat_template.{k}", v) for k, v in template.items() if k != "default"]
        named = [k for k in template if k != "default"]
        if named:
            out.append(KV("tokenizer.chat_templates", named, VT.ARRAY, VT.STRING))
    elif isinstance(template, str) and template:
        out.append(_str("tokenizer.chat_template", template))
    if arch == "llama" and vocab_size == 49152:
        # the reference sets add_bos_token = False for every 49152-token Llama vocabulary (Granite, SmolLM)
        out = [kv for kv in out if kv.key != "tokenizer.ggml.add_bos_token"] + [
            KV("tokenizer.ggml.add_bos_token", False, VT.BOOL)]
    return out


# ---------------------------------------------------------------------------------------------
# HF model -> GGUF
# ---------------------------------------------------------------------------------------------

@dataclass
class GGUFModel:
    """A model ready to be written: metadata and tensors (fp32 data, stored type per tensor)."""

    arch: str
    kvs: list[KV]
    weights: list[tuple[str, torch.Tensor]]  # fp32, torch order, names as in the file
    config: Any = None

    def tensors(self, outtype: QT = QT.F32) -> list[Tensor]:
        """The file's tensors in ``outtype`` (norms and 1-D tensors stay F32)."""
        out = []
        for name, t in self.weights:
            qt = stored_type(name, t.dim(), outtype)
            out.append(Tensor(name, tuple(t.shape), qt, lambda t=t, qt=qt: to_stored(t, qt)))
        return out


def from_hf(model: Any, tokenizer: Any, outtype: str = "f32", name: str | None = None,
            folder: str | Path | None = None, pre_tokenizer: str | None = None) -> GGUFModel:
    """Metadata and weights of a Llama/Qwen2 ``model`` as llama.cpp's converter would write them."""
    if outtype not in OUT_TYPES:
        raise UserError(f"unknown output type {outtype!r}", f"use one of {', '.join(OUT_TYPES)}")
    arch = architecture(model)
    weights = hf_weights(model)
    n_params = sum(t.numel() for _, t in weights)
    folder = Path(folder) if folder is not None else None
    if name is None and (folder is None or not folder.is_dir()):
        # no model folder to name it after: use the config's name (a Hub id or a path)
        name = getattr(model.config, "name_or_path", None) or None
        name = Path(name).name if name else None
    kvs = [_str("general.architecture", arch)]
    kvs += general_metadata(name, n_params, folder)
    kvs += hparams_metadata(model, arch, int(OUT_TYPES[outtype][1]))
    kvs.append(_u32("general.quantization_version", QUANTIZATION_VERSION))
    kvs += tokenizer_metadata(tokenizer, model.config, model.config.vocab_size, arch, pre_tokenizer)
    return GGUFModel(arch, kvs, weights, model.config)


def convert(model: Any, tokenizer: Any, out: str | Path, outtype: str = "f32", name: str | None = None,
            folder: str | Path | None = None, pre_tokenizer: str | None = None,
            progress: Callable[[Tensor], None] | None = None) -> dict[str, Any]:
    """Write ``model`` + ``tokenizer`` as a GGUF file ``out`` (f32, f16 or bf16); return a summary."""
    g = from_hf(model, tokenizer, outtype, name, folder, pre_tokenizer)
    tensors = g.tensors(OUT_TYPES[outtype][0])
    size = save_gguf(out, g.kvs, tensors, progress)
    return {"out": str(out), "architecture": g.arch, "outtype": outtype, "tensors": len(tensors),
            "parameters": sum(t.numel() for _, t in g.weights), "bytes": size}
