"""Hugging Face <-> GGUF: architectures, tensor names, and the layout changes llama.cpp's converter makes.

Source: ggml-org/llama.cpp ``convert_hf_to_gguf.py`` (``conversion/llama.py`` ``LlamaModel.permute`` and
``SmolLM3Model``, ``qwen.py`` ``Qwen2Model``/``Qwen3Model``, ``gemma.py`` ``Gemma3Model``, ``phi.py``
``Phi3MiniModel``, ``gpt2.py``) and ``gguf-py/gguf/tensor_mapping.py``. One :class:`Arch` per Hugging Face
``model_type`` (:data:`MODEL_TYPES`) says what differs:

* names: ``model.layers.{i}.self_attn.q_proj.weight`` -> ``blk.{i}.attn_q.weight`` and so on, one table per
  family (:data:`TENSOR_NAMES`, :data:`QWEN3_NAMES` with the q/k norms, :data:`GEMMA3_NAMES` with the
  norms after attention and MLP, :data:`PHI3_NAMES` with the fused qkv and gate-up projections,
  :data:`GPT2_NAMES`); ``lm_head.weight`` -> ``output.weight``; GPT-2's Conv1D weights
  (:data:`GPT2_CONV1D`) are stored (in, out) and transposed to (out, in) on the way;
* the q/k permutation (Llama, Mistral, SmolLM3: ``Arch.permute_qk``): Hugging Face's rotary embedding
  rotates the two *halves* of each head (``rotate_half``), ggml's ``rope`` (normal mode) rotates
  *adjacent pairs*. Within each head the rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` are reordered to
  ``[x_0, y_0, x_1, y_1, ...]`` (for k, with the number of key/value heads), so the same rotation is
  applied to the same pairs. Qwen2/3, Gemma 3 and Phi-3 keep the halves layout (llama.cpp runs them
  with NEOX rope), so they are not permuted;
* Gemma's norms (``Arch.norm_shift``): ``Gemma3RMSNorm`` computes ``x_hat * (1 + w)``, llama.cpp
  ``x_hat * w'``, so the converter stores ``w' = w + 1`` (fp32) for every tensor named ``*norm.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmcourse.core.errors import UserError

# per-layer Hugging Face module -> GGUF tensor: the Llama family (Llama 2/3, Mistral, SmolLM2/3) and Qwen2
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
# Qwen3: RMSNorm of each head's q and k before RoPE
QWEN3_NAMES = {**TENSOR_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma 3: norms before and after attention and MLP ("sandwich" norms), q/k norms
GEMMA3_NAMES = {**QWEN3_NAMES, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
# Phi-3: q, k, v fused in one projection (rows q, then k, then v), gate and up fused (rows gate, then up)
PHI3_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
              "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
# GPT-2 (transformer.h.{i}.*): its Conv1D layers store (in, out) weights, transposed on the way
GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class Arch:
    """What the converter does for one Hugging Face ``model_type`` (llama.cpp's model class for it)."""

    gguf: str  # llama.cpp's architecture name (general.architecture, the prefix of its keys)
    layers: dict[str, str]  # per-layer HF module -> GGUF tensor
    permute_qk: bool = False  # ggml runs it with "normal" (adjacent pairs) RoPE: q/k rows are permuted
    norm_shift: float = 0.0  # stored norm weight = HF weight + shift (Gemma's RMSNorm scales by 1 + w)


# Hugging Face model_type -> what llama.cpp's convert_hf_to_gguf.py does with it (the converters supported here)
MODEL_TYPES: dict[str, Arch] = {
    "llama": Arch("llama", TENSOR_NAMES, permute_qk=True),  # Llama 2, Llama 3.x, SmolLM2
    "mistral": Arch("llama", TENSOR_NAMES, permute_qk=True),  # llama.cpp runs Mistral as llama
    "smollm3": Arch("smollm3", TENSOR_NAMES, permute_qk=True),  # NoPE every 4th layer (fixed in llama.cpp)
    "qwen2": Arch("qwen2", TENSOR_NAMES),  # Qwen2, Qwen2.5
    "qwen3": Arch("qwen3", QWEN3_NAMES),
    "gemma3_text": Arch("gemma3", GEMMA3_NAMES, norm_shift=1.0),
    "phi3": Arch("phi3", PHI3_NAMES),  # Phi-3, Phi-3.5, Phi-4 (mini)
    "gpt2": Arch("gpt2", GPT2_NAMES),
}
# GGUF architecture -> the Hugging Face model_type it is read back as
GGUF_MODEL_TYPES = {"llama": "llama", "smollm3": "smollm3", "qwen2": "qwen2", "qwen3": "qwen3",
                    "gemma3": "gemma3_text", "phi3": "phi3", "gpt2": "gpt2"}


def supported() -> str:
    """The Hugging Face model types ``convert gguf`` supports, for error messages."""
    return ", ".join(sorted(MODEL_TYPES))


def model_arch(model_type: str | None, what: str = "model") -> Arch:
    """The converter of a Hugging Face ``model_type``; a one-line error naming the supported ones."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"{what} type {model_type!r} cannot be converted to GGUF here",
                        f"supported model types: {supported()}")
    return MODEL_TYPES[model_type]


def mapped_name(hf_name: str, arch: Arch | None = None) -> str | None:
    """The GGUF name of a Hugging Face parameter, or None when the name is not one the converter maps.

    Without ``arch``, the Llama family's names (and GPT-2's), which every supported architecture shares
    for its linear layers."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[2].isdecimal():
        module = ".".join(parts[3:])
        layers = arch.layers if arch is not None else {**PHI3_NAMES, **TENSOR_NAMES}
        if parts[:2] == ["model", "layers"] and module in layers:
            return f"blk.{int(parts[2])}.{layers[module]}.{suffix}"
        if parts[:2] == ["transformer", "h"] and module in GPT2_NAMES:
            return f"blk.{int(parts[2])}.{GPT2_NAMES[module]}.{suffix}"
    return None


def _not_written(hf_name: str) -> bool:
    """Buffers the converter leaves out: GPT-2's causal masks, rotary-embedding caches."""
    stem = hf_name.rpartition(".")[0]
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["transformer", "h"] and parts[2].isdecimal():
        module = ".".join(parts[3:])
        if module in ("attn", "attn.masked") or hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            return True
    return stem.endswith("rotary_emb") or stem.endswith("rotary_emb_local")


def gguf_tensor_name(hf_name: str, arch: Arch | None = None) -> str | None:
    """The GGUF name of a Hugging Face parameter of a supported model (None: not written)."""
    name = mapped_name(hf_name, arch)
    if name is None and not _not_written(hf_name):
        raise UserError(f"cannot map the tensor {hf_name!r} to a GGUF name",
                        f"supported model types for `convert gguf`: {supported()}")
    return name


def architecture(model: Any) -> Arch:
    """The converter of a Hugging Face model (from its ``config.model_type``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        archs = getattr(model.config, "architectures", None) or [type(model).__name__]
        raise UserError(f"{archs[0]} ({model_type}) cannot be converted to GGUF here",
                        f"supported model types: {supported()}")
    return MODEL_TYPES[model_type]


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


def head_counts(model: Any) -> tuple[int, int]:
    """(query heads, key/value heads) of a Hugging Face model: the counts the q/k permutation uses."""
    n_head = model.config.num_attention_heads
    return n_head, getattr(model.config, "num_key_value_heads", None) or n_head


def is_norm(gguf_name: str) -> bool:
    """Whether a GGUF tensor is a norm weight (what Gemma's converter shifts by +1: names ending in ``norm.weight``)."""
    return gguf_name.endswith("norm.weight")


def to_gguf_layout(arch: Arch, hf_name: str, gguf_name: str, t: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """A Hugging Face tensor as the converter stores it: Conv1D transposed, Llama's q/k permuted, Gemma's
    norms shifted by +1."""
    if arch.gguf == "gpt2" and hf_name.endswith(GPT2_CONV1D):
        t = t.t().contiguous()  # Conv1D (in, out) -> (out, in)
    if arch.permute_qk:
        if ".attn_q." in gguf_name:
            t = permute_rope(t, n_head)
        elif ".attn_k." in gguf_name:
            t = permute_rope(t, n_kv)
    if arch.norm_shift and is_norm(gguf_name):
        t = t + arch.norm_shift  # fp32, as the reference adds (to an fp32 torch tensor)
    return t


def from_gguf_layout(arch: Arch, hf_name: str, gguf_name: str, w: torch.Tensor, hf_shape: torch.Size,
                     n_head: int, n_kv: int) -> torch.Tensor:
    """Inverse of :func:`to_gguf_layout`: a GGUF tensor (fp32) in the Hugging Face parameter's layout.

    Gemma's norms come back as ``w = w' - 1`` in fp32, and transformers computes with ``1 + w``: for a
    stored ``w' >= 0.5`` both steps are exact (Sterbenz), so HF scales by exactly the ``w'`` llama.cpp
    uses; below 0.5, ``1 + (w' - 1)`` may differ from ``w'`` by at most 2**-24 (half an ulp of 1)."""
    if arch.gguf == "gpt2" and hf_name.endswith(GPT2_CONV1D):
        w = w.reshape(hf_shape[::-1]).t()
    w = w.reshape(hf_shape)
    if arch.permute_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        w = unpermute_rope(w, n_head if ".attn_q." in gguf_name else n_kv)
    if arch.norm_shift and is_norm(gguf_name):
        w = w - arch.norm_shift
    return w
