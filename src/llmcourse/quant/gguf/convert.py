"""Hugging Face causal LM -> GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

Source: ggml-org/llama.cpp ``convert_hf_to_gguf.py`` (``conversion/base.py`` ``TextModel``, ``llama.py``
``LlamaModel``/``SmolLM3Model``, ``qwen.py`` ``Qwen2Model``/``Qwen3Model``, ``gemma.py`` ``Gemma3Model``,
``phi.py`` ``Phi3MiniModel``, ``gpt2.py``) and ``gguf-py/gguf/vocab.py`` (``SpecialVocab``), read and
re-written here for the architectures in :data:`.names.MODEL_TYPES` (Llama 2/3, Mistral, SmolLM2/3,
Qwen2/2.5, Qwen3, Gemma 3, Phi-3/4, GPT-2).

The file itself (header, metadata, tensor infos, aligned data) is written by
:mod:`llmcourse.core.gguf_container`; HF <-> GGUF names and the q/k permutation are in :mod:`.names`.

What the converter does to the weights:

* names and layout (:mod:`.names`): ``model.layers.{i}.self_attn.q_proj.weight`` -> ``blk.{i}.attn_q.weight``
  and so on; ``lm_head.weight`` -> ``output.weight``, left out when the embeddings are tied; GPT-2's
  Conv1D weights transposed to (out, in); Llama's q/k rows permuted from HF's rotate-halves order to
  ggml's adjacent pairs (Qwen, Gemma and Phi keep the halves layout: llama.cpp runs them with NEOX rope);
  Gemma's norms stored as ``w + 1``; Llama 3.1's RoPE scaling written as a ``rope_freqs`` tensor of
  per-frequency divisors (:func:`llama3_rope_factors`), first, as the reference's extra tensors;
* dtype: 1-D tensors, norms and position embeddings stay F32; the other weights become the output type
  (F32, F16 or BF16, round to nearest even).

Metadata, in llama.cpp's order: ``general.*`` (name, basename, finetune, size label through
``gguf.Metadata``, the model-naming heuristics the reference converter uses), the architecture's
hyperparameters (``{arch}.block_count`` ... ``general.file_type``; Phi-3's own order; Gemma 3's keys
re-written in place, as gguf-py's writer does), then the tokenizer (GPT-2 style BPE:
``tokenizer.ggml.model = "gpt2"``, the pre-tokenizer name, tokens, token types, merges, special token
ids, ``add_bos_token``/``add_eos_token`` and the chat template).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import LlamaFileType, TokenType

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, QUANTIZATION_VERSION, Tensor, save_gguf, to_stored
from llmcourse.quant.gguf.names import Arch, architecture, gguf_tensor_name, head_counts, to_gguf_layout

log = logging.getLogger(__name__)

OUT_TYPES = {"f32": (QT.F32, LlamaFileType.ALL_F32), "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
             "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16)}

# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def _is_tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is None or head.weight.data_ptr() == emb.weight.data_ptr() or bool(
        getattr(model.config, "tie_word_embeddings", False))


def hf_weights(model: Any, tokenizer: Any = None) -> list[tuple[str, torch.Tensor]]:
    """``(gguf_name, fp32 tensor)`` of a supported model, in the order the reference writes them.

    The reference converter first writes the tensors it generates (Llama 3's ``rope_freqs``), then walks
    a safetensors file, whose keys are sorted, so tensors follow the sorted Hugging Face names
    (``model.layers.10`` before ``model.layers.2``). Gemma 3's embedding rows past the tokenizer's
    vocabulary are dropped, as its converter does (``tokenizer`` gives that count).
    """
    arch = architecture(model)
    n_head, n_kv = head_counts(model)
    tied = _is_tied(model)
    out = []
    freqs = llama3_rope_factors(model.config) if arch.permute_qk else None
    if freqs is not None:
        out.append(("rope_freqs.weight", freqs))
    for hf_name, t in sorted(model.state_dict().items()):
        if tied and hf_name.startswith("lm_head."):
            continue
        name = gguf_tensor_name(hf_name, arch)
        if name is None:
            continue
        t = t.detach().to(torch.float32)
        if arch.gguf == "gemma3" and name == "token_embd.weight" and tokenizer is not None:
            tj = _tokenizer_json(tokenizer)
            t = t[: len(tj.get("model", {}).get("vocab", {})) + len(tj.get("added_tokens", []))]
        out.append((name, to_gguf_layout(arch, hf_name, name, t, n_head, n_kv)))
    return out


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """Llama 3.1's RoPE scaling as the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``
    (None without ``rope_type: llama3``).

    Frequencies whose wavelength ``2 pi / f`` is below ``L / high_freq_factor`` keep factor 1, those above
    ``L / low_freq_factor`` are divided by ``factor``, those between by ``1 / ((1 - s) / factor + s)`` with
    ``s = (L / wavelength - low) / (high - low)`` (``L`` the original context). The arithmetic is the
    reference converter's (torch float32 frequencies, Python scalars), so the bytes are the same.
    """
    c = config.to_dict()
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors: list[Any] = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def stored_type(name: str, n_dims: int, outtype: QT) -> QT:
    """The type a converted tensor is stored in: F32 for 1-D tensors and norms, else ``outtype``."""
    if (n_dims <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name in ("position_embd.weight", "token_types.weight")):
        return QT.F32
    return outtype


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


def _merged(kvs: list[KV]) -> list[KV]:
    """Keys written twice keep their first place and take the last value (gguf-py's ``GGUFWriter``
    overwrites a key in place: Gemma 3's converter re-writes keys its base class already wrote)."""
    merged: dict[str, KV] = {}
    for kv in kvs:
        merged[kv.key] = kv
    return list(merged.values())


def _rope(c: dict) -> tuple[dict, dict]:
    """(full-attention RoPE parameters, all RoPE parameters) as the reference's ``TextModel`` reads them."""
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if c.get("rope_theta") is not None and "rope_theta" not in rope:
            rope["rope_theta"] = c["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if c.get("partial_rotary_factor") is not None and "partial_rotary_factor" not in rope:
            rope["partial_rotary_factor"] = c["partial_rotary_factor"]
        if c.get("original_max_position_embeddings") is not None and "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = c["original_max_position_embeddings"]
    return rope.get("full_attention", rope), rope


def _text_model_hparams(c: dict, a: str, file_type: int) -> list[KV]:
    """``TextModel.set_gguf_parameters``: the keys every text architecture writes, in its order."""
    out = [_u32(f"{a}.block_count", c["num_hidden_layers"])]
    for key, names in [("context_length", ["max_position_embeddings"]), ("embedding_length", ["hidden_size"]),
                       ("feed_forward_length", ["intermediate_size"]),
                       ("attention.head_count", ["num_attention_heads"]),
                       ("attention.head_count_kv", ["num_key_value_heads"])]:
        v = next((c[n] for n in names if c.get(n) is not None), None)
        if v is not None:
            out.append(_u32(f"{a}.{key}", v))
    full, rope = _rope(c)
    rope_type, factor = full.get("rope_type"), full.get("factor")
    if rope_type == "linear" and factor is not None:
        out += [KV(f"{a}.rope.scaling.type", "linear", VT.STRING), _f32(f"{a}.rope.scaling.factor", factor)]
    elif rope_type == "yarn" and factor is not None:
        out += [KV(f"{a}.rope.scaling.type", "yarn", VT.STRING), _f32(f"{a}.rope.scaling.factor", factor),
                _u32(f"{a}.rope.scaling.original_context_length", full["original_max_position_embeddings"])]
        for key, names in [("yarn_ext_factor", ["extrapolation_factor"]),
                           ("yarn_attn_factor", ["attention_factor", "attn_factor"]),
                           ("yarn_beta_fast", ["beta_fast"]), ("yarn_beta_slow", ["beta_slow"])]:
            v = next((full[n] for n in names if full.get(n) is not None), None)
            if v is not None:
                out.append(_f32(f"{a}.rope.scaling.{key}", v))
    elif rope_type not in (None, "default", "llama3"):
        raise UserError(f"rope type {rope_type!r} is not supported by `convert gguf`",
                        "use a model with plain, linear, yarn or Llama 3 RoPE")
    if full.get("rope_theta") is not None:
        out.append(_f32(f"{a}.rope.freq_base", full["rope_theta"]))
    swa_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
    if swa_theta is not None:
        out.append(_f32(f"{a}.rope.freq_base_swa", swa_theta))
    if c.get("rms_norm_eps") is not None:
        out.append(_f32(f"{a}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        out += [_u32(f"{a}.attention.key_length", c["head_dim"]), _u32(f"{a}.attention.value_length", c["head_dim"])]
    out.append(_u32("general.file_type", file_type))
    return out


def _phi3_hparams(c: dict, file_type: int) -> list[KV]:
    """``Phi3MiniModel.set_gguf_parameters`` (its own order; the sliding window 0 when there is none)."""
    full, _ = _rope(c)
    if full.get("long_factor"):
        raise UserError("Phi-3 long-context RoPE (long_factor/short_factor) is not supported by `convert gguf`",
                        "convert a 4k-context Phi-3/Phi-4 model")
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    rope_dims = int(full.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    return [_u32("phi3.context_length", c["max_position_embeddings"]),
            _u32("phi3.rope.scaling.original_context_length", full["original_max_position_embeddings"]),
            _u32("phi3.embedding_length", n_embd), _u32("phi3.feed_forward_length", c["intermediate_size"]),
            _u32("phi3.block_count", c["num_hidden_layers"]), _u32("phi3.attention.head_count", n_head),
            _u32("phi3.attention.head_count_kv", c["num_key_value_heads"]),
            _f32("phi3.attention.layer_norm_rms_epsilon", c["rms_norm_eps"]),
            _u32("phi3.rope.dimension_count", rope_dims), _f32("phi3.rope.freq_base", full["rope_theta"]),
            _u32("general.file_type", file_type), _u32("phi3.attention.sliding_window", c.get("sliding_window") or 0)]


def _gemma3_hparams(c: dict, file_type: int) -> list[KV]:
    """``Gemma3Model.set_gguf_parameters``: the base keys, then its own (some re-written, with its defaults)."""
    out = _text_model_hparams(c, "gemma3", file_type)
    full, _ = _rope(c)
    out += [_u32("gemma3.context_length", c.get("max_position_embeddings", 131072)),
            _u32("gemma3.attention.head_count", c.get("num_attention_heads", 8)),
            _f32("gemma3.attention.layer_norm_rms_epsilon", c.get("rms_norm_eps", 1e-6)),
            _u32("gemma3.attention.key_length", c.get("head_dim", 256)),
            _u32("gemma3.attention.value_length", c.get("head_dim", 256)),
            _f32("gemma3.rope.freq_base", full.get("rope_theta", 1_000_000.0))]
    if c.get("attn_logit_softcapping") is not None:
        raise UserError("Gemma 3 with attention logit soft-capping cannot be converted (llama.cpp has none)",
                        "set attn_logit_softcapping to null (Gemma 3 has none)")
    if c.get("final_logit_softcapping"):
        out.append(_f32("gemma3.final_logit_softcapping", c["final_logit_softcapping"]))
    if c.get("sliding_window_pattern") != 1:
        out.append(_u32("gemma3.attention.sliding_window", c["sliding_window"]))
    out.append(_u32("gemma3.attention.head_count_kv", c.get("num_key_value_heads", 4)))
    _warn_gemma3_differences(c)
    return _merged(out)


def _warn_gemma3_differences(c: dict) -> None:
    """What llama.cpp fixes for Gemma 3 and a config may set otherwise (the file is written anyway, as the
    reference does; llama.cpp then computes another model)."""
    if c.get("query_pre_attn_scalar") not in (None, c.get("head_dim", 256)):
        log.warning("query_pre_attn_scalar %s != head_dim: llama.cpp scales attention by 1/sqrt(head_dim)",
                    c["query_pre_attn_scalar"])
    types = c.get("layer_types")
    if types and types != ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]:
        log.warning("layer_types is not Gemma 3's 5 sliding : 1 full pattern, which llama.cpp assumes")


def _smollm3_check(c: dict) -> None:
    """llama.cpp skips RoPE in every 4th SmolLM3 layer (fixed, nothing is written): say so if the config differs."""
    layers = c.get("no_rope_layers")
    if layers and list(layers) != [int((i + 1) % 4 != 0) for i in range(len(layers))]:
        log.warning("no_rope_layers is not SmolLM3's every-4th-layer pattern, which llama.cpp assumes")


def hparams_metadata(model: Any, arch: Arch, file_type: int) -> list[KV]:
    """The hyperparameter keys llama.cpp's converter writes for ``arch``, in its order."""
    c = model.config.to_dict()
    a = arch.gguf
    if a == "gpt2":
        # the reference reads n_ctx, which configs saved by recent transformers no longer carry
        return [_u32("gpt2.block_count", c["n_layer"]), _u32("gpt2.context_length", c.get("n_ctx") or c["n_positions"]),
                _u32("gpt2.embedding_length", c["n_embd"]), _u32("gpt2.feed_forward_length", c.get("n_inner") or 4 * c["n_embd"]),
                _u32("gpt2.attention.head_count", c["n_head"]),
                _f32("gpt2.attention.layer_norm_epsilon", c["layer_norm_epsilon"]),
                _u32("general.file_type", file_type)]
    if a == "phi3":
        return _phi3_hparams(c, file_type)
    if a == "gemma3":
        return _gemma3_hparams(c, file_type)
    out = _text_model_hparams(c, a, file_type)
    if arch.permute_qk:  # LlamaModel (llama, mistral, smollm3): the vocabulary size and the rotary width
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        out += [_u32(f"{a}.vocab_size", c["vocab_size"]), _u32(f"{a}.rope.dimension_count", head_dim)]
    if a == "smollm3":
        _smollm3_check(c)
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


# the architectures whose vocabulary is written by ``LlamaModel.set_vocab`` (add_space_prefix, the 49152 rule)
LLAMA_VOCAB = ("llama", "smollm3")


def tokenizer_metadata(tokenizer: Any, config: Any, vocab_size: int, arch: str,
                       pre_tokenizer: str | None = None) -> list[KV]:
    """The ``tokenizer.*`` keys of a GPT-2 style BPE tokenizer, as the reference converter writes them."""
    tj = _tokenizer_json(tokenizer)
    if tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback"):
        raise UserError("only GPT-2 style byte-level BPE tokenizers are supported by `convert gguf` (not "
                        "SentencePiece vocabularies such as Gemma's, Llama 2's or Phi-3-mini's)",
                        "use a model with a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM, Phi-4...)")
    out: list[KV] = []
    add_prefix = getattr(tokenizer, "init_kwargs", {}).get("add_prefix_space")
    if arch in LLAMA_VOCAB and isinstance(add_prefix, bool):
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
    if arch in LLAMA_VOCAB and vocab_size == 49152:
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
    """Metadata and weights of a supported ``model`` (:data:`.names.MODEL_TYPES`) as llama.cpp's converter would write them."""
    if outtype not in OUT_TYPES:
        raise UserError(f"unknown output type {outtype!r}", f"use one of {', '.join(OUT_TYPES)}")
    arch = architecture(model)
    weights = hf_weights(model, tokenizer)
    n_params = sum(t.numel() for _, t in weights)
    folder = Path(folder) if folder is not None else None
    if name is None and (folder is None or not folder.is_dir()):
        # no model folder to name it after: use the config's name (a Hub id or a path)
        name = getattr(model.config, "name_or_path", None) or None
        name = Path(name).name if name else None
    kvs = [_str("general.architecture", arch.gguf)]
    kvs += general_metadata(name, n_params, folder)
    kvs += hparams_metadata(model, arch, int(OUT_TYPES[outtype][1]))
    kvs.append(_u32("general.quantization_version", QUANTIZATION_VERSION))
    kvs += tokenizer_metadata(tokenizer, model.config, model.config.vocab_size, arch.gguf, pre_tokenizer)
    return GGUFModel(arch.gguf, kvs, weights, model.config)


def convert_to_gguf(model: Any, tokenizer: Any, out: str | Path, outtype: str = "f32", name: str | None = None,
            folder: str | Path | None = None, pre_tokenizer: str | None = None,
            progress: Callable[[Tensor], None] | None = None) -> dict[str, Any]:
    """Write ``model`` + ``tokenizer`` as a GGUF file ``out`` (f32, f16 or bf16); return a summary."""
    g = from_hf(model, tokenizer, outtype, name, folder, pre_tokenizer)
    tensors = g.tensors(OUT_TYPES[outtype][0])
    size = save_gguf(out, g.kvs, tensors, progress)
    return {"out": str(out), "architecture": g.arch, "outtype": outtype, "tensors": len(tensors),
            "parameters": sum(t.numel() for _, t in g.weights), "bytes": size}
