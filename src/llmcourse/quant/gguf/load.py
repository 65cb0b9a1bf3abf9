"""GGUF -> torch: a GGUF file's tensors read lazily, de-quantized to fp32, copied into a Hugging Face model.

The container is parsed by :func:`llmcourse.core.gguf_container.read_gguf_header`; each tensor is read
from its offset only when asked for (:class:`SourceTensor`), so quantizing a file streams one tensor at a
time. ``to_float32`` inverts the storage types (F16/BF16 bits, or our ggml de-quantizers); ``load_weights``
inverts the converter's names and q/k permutation (:mod:`.names`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llmcourse.core.env import env_choice
from llmcourse.core.errors import UserError
from llmcourse.core.formats import read_gguf_model
from llmcourse.core.gguf_container import KV, TensorInfo, to_stored
from llmcourse.core.models import LoadedModel
from llmcourse.quant.gguf.blocks import KERNELS
from llmcourse.quant.gguf.convert import GGUFModel
from llmcourse.quant.gguf.names import (
    GGUF_MODEL_TYPES,
    architecture,
    from_gguf_layout,
    gguf_tensor_name,
    head_counts,
)
from llmcourse.quant.gguf.quantize import dequantize, row_bytes


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
    if not path.exists():
        raise UserError(f"GGUF file {path} does not exist", "check the path")
    kvs, infos = read_gguf_model(path)  # structure and meaning checked: a one-line error otherwise
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
            g = gguf_tensor_name(hf_name, arch)
            if g is None or g not in by_name:
                if g == "output.weight" and "token_embd.weight" in by_name:
                    continue  # tied to the embeddings
                raise UserError(f"{path} has no tensor {g} for {hf_name}", "use the GGUF of this model")
            w = torch.from_numpy(to_float32(by_name[g]))
            param.copy_(from_gguf_layout(arch, hf_name, g, w, param.shape, n_head, n_kv).to(param.dtype))
            copied += 1
    return {"tensors": copied}


# ---------------------------------------------------------------------------------------------
# The fast loader registered for files that start with b"GGUF" (``Lab.file_formats``)
# ---------------------------------------------------------------------------------------------

def hf_config_dict(kvs: list[KV], infos: list[TensorInfo],
                   read: Callable[[TensorInfo], np.ndarray] | None = None) -> dict[str, Any]:
    """The config dict transformers derives from a GGUF's metadata (``load_gguf_checkpoint``), completed
    with what llama.cpp fixes for the architecture and transformers' table leaves out.

    Same rename table (``GGUF_TO_TRANSFORMERS_MAPPING["config"]``, llama's for SmolLM3), same special
    cases: a llama file named ``mistral`` is Mistral, the head is tied when there is no ``output.weight``,
    the vocabulary size falls back to the token list's length. Then, per architecture (:func:`_arch_config`):
    head_dim from ``attention.key_length``; linear and YaRN RoPE scaling; Gemma 3's two RoPE bases, its attention scale 1/sqrt(head_dim)
    and final soft-capping; Phi-3's rotary fraction, original context and sliding window; Llama 3's RoPE
    scaling recovered from ``rope_freqs`` (whose values ``read`` gives).
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    meta = {kv.key: kv.value for kv in kvs}
    arch = meta["general.architecture"]
    if arch not in LOADABLE:
        raise UserError(f"GGUF architecture {arch!r} cannot be loaded here", f"supported: {', '.join(LOADABLE)}")
    name = meta.get("general.name")
    hf_arch = "mistral" if arch == "llama" and name == "mistral" else arch
    renames = dict(GGUF_TO_TRANSFORMERS_MAPPING["config"])
    renames.setdefault("smollm3", renames["llama"])
    cfg: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in infos)}
    for key, value in meta.items():
        prefix, _, rest = key.replace(arch, hf_arch, 1).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, hf_arch)
        target = renames.get(prefix, {}).get(rest)
        if target not in (None, -1):
            cfg[target] = value
    if "vocab_size" not in cfg and isinstance(meta.get("tokenizer.ggml.tokens"), list):
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if hf_arch != "mistral":
        cfg["model_type"] = GGUF_MODEL_TYPES[arch]
    cfg.update(_arch_config(arch, meta, cfg, {t.name: t for t in infos}, read))
    return cfg


def _arch_config(arch: str, meta: dict[str, Any], cfg: dict[str, Any], infos: dict[str, TensorInfo],
                 read: Callable[[TensorInfo], np.ndarray] | None) -> dict[str, Any]:
    """The config entries transformers' rename table does not give for ``arch`` (see :func:`hf_config_dict`)."""
    out: dict[str, Any] = {}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn") and arch != "phi3":  # RoPE scaling the converter wrote from rope_parameters
        rope = {"rope_type": scaling, "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                "factor": float(meta[f"{arch}.rope.scaling.factor"])}
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
            for key, name in [("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                              ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")]:
                if f"{arch}.rope.scaling.{key}" in meta:
                    rope[name] = float(meta[f"{arch}.rope.scaling.{key}"])
        out["rope_parameters"] = rope
    if f"{arch}.attention.key_length" in meta:
        out["head_dim"] = meta[f"{arch}.attention.key_length"]
    if arch == "gemma3":
        out["rope_theta"] = meta.get("gemma3.rope.freq_base", 1_000_000.0)
        out["rope_local_base_freq"] = meta.get("gemma3.rope.freq_base_swa", 10_000.0)
        out["query_pre_attn_scalar"] = out.get("head_dim", 256)  # llama.cpp scales by 1/sqrt(head_dim)
        out["final_logit_softcapping"] = meta.get("gemma3.final_logit_softcapping")
        if not meta.get("gemma3.attention.sliding_window"):  # no window: every layer attends fully
            out["layer_types"] = ["full_attention"] * int(meta["gemma3.block_count"])
    elif arch == "phi3":
        dims = meta.get("phi3.rope.dimension_count")
        if dims:
            out["partial_rotary_factor"] = dims * cfg["num_attention_heads"] / cfg["hidden_size"]
        if "phi3.rope.scaling.original_context_length" in meta:
            out["original_max_position_embeddings"] = meta["phi3.rope.scaling.original_context_length"]
        out["sliding_window"] = meta.get("phi3.attention.sliding_window") or None
        if "rope_factors_long.weight" in infos:
            raise UserError("Phi-3 long-context RoPE factors cannot be loaded here", "use a 4k-context Phi-3 GGUF")
    elif arch in ("llama", "smollm3") and "rope_freqs.weight" in infos:
        if read is None:
            raise UserError("this GGUF's RoPE scaling (rope_freqs) needs the file's tensor data",
                            "load it with load_model (which reads rope_freqs)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        ctx = int(cfg.get("max_position_embeddings") or 16384)
        out["rope_parameters"] = llama3_rope_parameters(read(infos["rope_freqs.weight"]).reshape(-1),
                                                        float(cfg.get("rope_theta", 10000.0)), head_dim,
                                                        original_ctx=min(8192, ctx // 2))
    return out


def llama3_rope_parameters(factors: np.ndarray, theta: float, head_dim: int, original_ctx: int = 8192) -> dict[str, Any]:
    """Llama 3 RoPE scaling parameters that reproduce llama.cpp's ``rope_freqs`` divisors.

    The divisors are 1 for short wavelengths, ``factor`` for long ones and ``1 / ((1 - s) / factor + s)``
    between, with ``s = (L / wavelength - low) / (high - low)`` linear in ``1 / wavelength``. Only the
    thresholds ``L / low`` and ``L / high`` matter (scaling L, low and high together changes nothing), so
    L is fixed to ``original_ctx`` and low/high are solved from two divisors in the smooth band, or, when
    the band holds fewer than two frequencies, from the band's edges and the lone frequency in it (any
    edges between the neighbouring wavelengths give the same divisors).
    """
    dims = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    wavelen = 2 * np.pi * theta ** dims  # (head_dim / 2,)
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "original_max_position_embeddings": original_ctx}
    if factor <= 1.0:
        return {**params, "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    smooth = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if smooth.sum() >= 2:
        s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)  # s = a / wavelength + b
        a, b = np.polyfit(1 / wavelen[smooth], s, 1)
        high_minus_low = original_ctx / a
        low = -b * high_minus_low
        return {**params, "low_freq_factor": float(low), "high_freq_factor": float(low + high_minus_low)}
    ones, full = wavelen[factors <= 1.0 + 1e-6], wavelen[factors >= factor * (1 - 1e-6)]
    # band edges: the factor-1 side just past the longest factor-1 wavelength, the other side just before
    # the shortest fully scaled one; a lone smooth frequency (s0 at wavelength w0) fixes the second edge
    hi_wave = float(ones.max()) if ones.size else float(wavelen.min()) / 2
    lo_wave = float(full.min()) if full.size else float(wavelen.max()) * 2
    if smooth.sum() == 1:
        w0 = float(wavelen[smooth][0])
        s0 = (1 / float(factors[smooth][0]) - 1 / factor) / (1 - 1 / factor)
        hi_wave = math.sqrt(hi_wave * w0)  # any edge between the two works; solve the other from s0
        lo_wave = 1 / ((1 / w0 - s0 / hi_wave) / (1 - s0))
    else:
        hi_wave, lo_wave = hi_wave * 1.0000001, lo_wave * 0.9999999
    return {**params, "low_freq_factor": original_ctx / lo_wave, "high_freq_factor": original_ctx / hi_wave}


LOADABLE = tuple(GGUF_MODEL_TYPES)


def gguf_tokenizer(kvs: list[KV]) -> Any:
    """The tokenizer transformers builds from a GGUF (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``),
    from the metadata already parsed (transformers' own reader takes ~5 s on a 49k vocabulary)."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    meta = {kv.key: kv.value for kv in kvs}
    grouped = {group: {n: meta[f"tokenizer.{k}"] for k, n in renames.items() if f"tokenizer.{k}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer:
        raise UserError("the GGUF has no tokenizer (tokenizer.ggml.tokens)", "convert the model with its tokenizer")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
        return TokenizersBackend(tokenizer_object=backend, **config, **extra)
    except Exception as e:  # untrusted vocabulary through a third-party builder: any failure is bad input
        raise UserError(f"the GGUF's tokenizer cannot be built ({type(e).__name__}: {str(e)[:150]})",
                        "re-convert the model with its tokenizer") from e


def _q8_0_fp32(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (34 bytes: an fp16 scale ``d``, then 32 int8 codes ``q``) -> fp32 ``d * q``, in one pass.

    The same values as the ggml de-quantizer (``float(q) * float(d)`` in fp32), read straight from
    the mapped bytes: one multiply writes the output, with no copy of the codes or float temporary.
    """
    blocks = raw.reshape(-1, 34)
    d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)  # (n_blocks, 1)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    np.multiply(blocks[:, 2:].view(np.int8), d, out=out, dtype=np.float32)
    return out


def _tensor_fp32(mm: np.ndarray, t: TensorInfo) -> torch.Tensor:
    """One tensor of the mapped file as fp32 (rows, n_per_row): F32 read in place, the rest de-quantized."""
    raw = mm[t.offset:t.offset + t.nbytes]
    n = t.shape[-1]
    if t.qtype == QT.F32:
        arr = raw.view(np.float32).reshape(-1, n)
    elif t.qtype == QT.F16:
        arr = raw.view(np.float16).astype(np.float32).reshape(-1, n)
    elif t.qtype == QT.BF16:
        arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, n)
    elif t.qtype == QT.Q8_0:
        arr = _q8_0_fp32(raw)
    elif t.qtype in KERNELS:
        arr = dequantize(raw.reshape(-1, row_bytes(t.qtype, n)), t.qtype)
    else:  # a type we have no kernel for: gguf-py's numpy de-quantizer
        from gguf.quants import dequantize as gguf_dequantize

        arr = gguf_dequantize(np.asarray(raw).reshape(-1, t.nbytes // max(1, math.prod(t.shape[:-1]))), t.qtype)
    return torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(-1, n))


@functools.cache
def blocks_by_default() -> bool:
    """Whether :func:`load_model` keeps quantized weights as blocks when not told: ``LLMCOURSE_GGUF_BLOCKS``
    (``0`` no, ``1`` yes, the default), read once per process; another value logs a warning and keeps yes."""
    return env_choice("LLMCOURSE_GGUF_BLOCKS", ("1", "0"), "1") != "0"


def load_model(path: str | Path, dtype: str = "fp32", blocks: bool | None = None) -> LoadedModel:
    """A GGUF file as a Hugging Face model, identical to transformers' GGUF path, in about a second.

    ``blocks`` (default: on for fp32 unless ``LLMCOURSE_GGUF_BLOCKS=0``, when the block kernels build):
    projections and the token-embedding table stored in a quantized type the kernels run stay as the
    file's blocks, memory-mapped (:mod:`.execute`), instead of fp32 copies; ``blocks=False`` de-quantizes
    everything (the exact float model of the file, as transformers builds it).

    The header is parsed once (:func:`llmcourse.core.formats.read_gguf_model`, which checks it
    structurally and semantically), the data memory-mapped, every tensor the architecture needs
    de-quantized with our kernels and copied in under its Hugging Face name (q/k un-permuted). A
    tensor missing, left over, or of another shape is a one-line error, never random weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    kvs, infos = read_gguf_model(path)
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: F32 tensors are used in place
    cfg_dict = hf_config_dict(kvs, infos, lambda t: _tensor_fp32(mm, t).numpy())
    try:
        cfg = AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except Exception as e:  # untrusted metadata through transformers' validators: any failure is bad input
        raise UserError(f"GGUF {path} describes no buildable model ({type(e).__name__}: {str(e)[:150]})",
                        "re-convert the model") from e
    tok = gguf_tokenizer(kvs)
    tok.llmcourse_chat_template_origin = f"{path} (key tokenizer.chat_template)"  # named by chat-template errors
    arch = architecture(model)
    n_head, n_kv = head_counts(model)
    by_name = {t.name: t for t in infos}
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    used = {"rope_freqs.weight"} if "rope_freqs.weight" in by_name and "rope_parameters" in cfg_dict else set()
    todo: list[tuple[str, torch.Size, str, TensorInfo]] = []
    kept: list[tuple[str, TensorInfo]] = []  # tensors executed as stored blocks (module name, tensor)
    if blocks is None:
        blocks = dtype == "fp32" and blocks_by_default()
    if blocks:
        from llmcourse.core.runtime.kernels import load as load_kernels

        blocks = load_kernels()
    for hf_name, param in model.state_dict().items():
        g = gguf_tensor_name(hf_name, arch)
        if g is None:
            continue
        if g not in by_name:
            if g == "output.weight" and cfg.tie_word_embeddings:
                continue
            raise UserError(f"GGUF {path} has no tensor {g} (for {hf_name})", "re-convert the model")
        t = by_name[g]
        if math.prod(t.shape) != param.numel():
            raise UserError(f"GGUF {path}: tensor {g} is {t.shape}, the metadata implies {tuple(param.shape)}",
                            "re-convert the model")
        used.add(g)
        if blocks and _executable(model, arch, hf_name, t):
            kept.append((hf_name.removesuffix(".weight"), t))
        else:
            todo.append((hf_name, param.shape, g, t))
    extra = sorted(set(by_name) - used)
    if extra:
        raise UserError(f"GGUF {path} holds {len(extra)} tensors its architecture does not use (e.g. {extra[0]})",
                        "re-convert the model")

    def tensor(item: tuple[str, torch.Size, str, TensorInfo]) -> torch.Tensor:
        hf_name, shape, g, t = item
        w = from_gguf_layout(arch, hf_name, g, _tensor_fp32(mm, t), shape, n_head, n_kv)
        return w.to(torch_dtype) if torch_dtype != torch.float32 else w

    # numpy releases the GIL in its loops: de-quantize on as many threads as torch computes with
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        state = dict(zip((item[0] for item in todo), pool.map(tensor, todo), strict=True))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if kept:
        _keep_blocks(model, mm, kept, n_head, n_kv, arch.permute_qk, torch_dtype)
    _rebuild_meta_buffers(model)
    return LoadedModel(model.eval(), tok, str(path), path, kind="gguf")


def _executable(model: Any, arch: Any, hf_name: str, t: TensorInfo) -> bool:
    """Whether tensor ``t`` (for ``hf_name``) can stay as blocks: an ``nn.Linear`` weight or the token
    embeddings, of a type the kernels run (GPT-2's Conv1D weights are stored transposed: de-quantized)."""
    from llmcourse.quant.gguf.execute import runnable

    if not hf_name.endswith(".weight") or not runnable(int(t.qtype), t.shape[-1]) or len(t.shape) != 2:
        return False
    module = model.get_submodule(hf_name.removesuffix(".weight"))
    return type(module) is torch.nn.Linear or isinstance(module, torch.nn.Embedding)


def _keep_blocks(model: Any, mm: np.ndarray, kept: list[tuple[str, TensorInfo]], n_head: int, n_kv: int,
                 permute_qk: bool, dtype: torch.dtype) -> None:
    """Swap in :class:`~.execute.BlockLinear`/:class:`~.execute.BlockEmbedding` modules over the mapped
    blocks; q/k rows are put back from ggml's RoPE pair order by a row gather (blocks never straddle rows);
    a tied output head multiplies by the embedding's blocks. Legacy blocks (Q4_0 ... Q8_0) are repacked for
    the kernels' 8-row groups (:func:`~llmcourse.core.runtime.kernels.interleave`: the same bytes, in memory)."""
    from llmcourse.core.runtime.kernels import interleave
    from llmcourse.quant.gguf.execute import BlockEmbedding, BlockLinear

    tied = getattr(model.config, "tie_word_embeddings", False)
    emb_blocks = None
    for name, t in kept:
        rows, n = t.shape
        raw = torch.from_numpy(mm[t.offset:t.offset + t.nbytes]).view(rows, -1)
        g = t.name
        permuted = permute_qk and (".attn_q." in g or ".attn_k." in g)
        if permuted:
            from llmcourse.quant.gguf.names import unpermute_rope

            order = unpermute_rope(torch.arange(rows).view(rows, 1), n_head if ".attn_q." in g else n_kv).view(-1)
            raw = raw[order]
        raw, qtype = interleave(raw, int(t.qtype), n)
        if qtype != int(t.qtype) or permuted:
            _release(mm, t.offset, t.nbytes)  # a copy is kept: the file's pages are not needed in memory
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, torch.nn.Embedding):
            scale = getattr(old, "scalar_embed_scale", None)
            setattr(parent, child, BlockEmbedding(raw, qtype, n, scale=scale, dtype=dtype))
            emb_blocks = (raw, qtype, n, rows)
        else:
            bias = old.bias.detach() if old.bias is not None and not old.bias.is_meta else None
            setattr(parent, child, BlockLinear(raw, qtype, n, rows, bias))
    if tied and emb_blocks is not None and type(model.lm_head) is torch.nn.Linear:
        raw, qtype, n, rows = emb_blocks
        model.lm_head = BlockLinear(raw, qtype, n, rows, tied=True)


def _release(mm: np.ndarray, offset: int, nbytes: int) -> None:
    """Drop the mapped pages that lie wholly inside ``[offset, offset + nbytes)`` from this process's memory
    (``madvise(MADV_DONTNEED)``; read again from the file if ever touched): the range of a tensor that was
    copied (repacked, rows reordered), so that its bytes are not held twice."""
    import mmap

    m = getattr(mm, "_mmap", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-offset // page) * page, (offset + nbytes) // page * page
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _rebuild_meta_buffers(model: Any) -> None:
    """Rebuild on the CPU the modules whose non-persistent buffers (rotary ``inv_freq``) are still on meta,
    and set Gemma's embedding scale (``embed_scale``, the Python number the module keeps beside it)."""
    for name, module in list(model.named_modules()):
        scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.is_meta and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale)  # as the module's __init__ builds it
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=module.config))
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError("a tensor was left on the meta device")
