"""Hugging Face <-> GGUF: architecture names, tensor names and Llama's q/k permutation.

Source: ggml-org/llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``, ``modify_tensors``) and
``gguf-py/gguf/tensor_mapping.py``, for the Llama family, Qwen2 and GPT-2.

* names: ``model.layers.{i}.self_attn.q_proj.weight`` -> ``blk.{i}.attn_q.weight`` and so on
  (:data:`TENSOR_NAMES`, :data:`GPT2_NAMES`); ``lm_head.weight`` -> ``output.weight``; GPT-2's Conv1D
  weights (:data:`GPT2_CONV1D`) are stored (in, out) and transposed to (out, in) on the way;
* Llama's q/k permutation: Hugging Face's rotary embedding rotates the two *halves* of each head
  (``rotate_half``), ggml's ``rope`` (normal mode) rotates *adjacent pairs*. Within each head the rows
  ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` are reordered to ``[x_0, y_0, x_1, y_1, ...]`` (for k, with
  the number of key/value heads), so the same rotation is applied to the same pairs. Qwen2 keeps the
  halves layout (llama.cpp runs it with NEOX rope), so it is not permuted.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcourse.core.errors import UserError

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


def mapped_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face parameter, or None when the name is not one the converter maps."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[2].isdecimal():
        module = ".".join(parts[3:])
        if parts[:2] == ["model", "layers"] and module in TENSOR_NAMES:
            return f"blk.{int(parts[2])}.{TENSOR_NAMES[module]}.{suffix}"
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
    return stem.endswith("rotary_emb")


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face parameter of a Llama/Qwen2/GPT-2 model (None: not written)."""
    name = mapped_name(hf_name)
    if name is None and not _not_written(hf_name):
        raise UserError(f"cannot map the tensor {hf_name!r} to a GGUF name",
                        "only Llama-family, Qwen2 and GPT-2 models are supported by `convert gguf`")
    return name


def architecture(model: Any) -> str:
    """The GGUF architecture (``llama``/``qwen2``/``gpt2``) of a Hugging Face model."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    hf_arch = archs[0]
    if hf_arch not in ARCHITECTURES:
        raise UserError(f"{hf_arch} cannot be converted to GGUF here",
                        f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[hf_arch]


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


def to_gguf_layout(arch: str, hf_name: str, gguf_name: str, t: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """A Hugging Face tensor as the converter stores it: Conv1D transposed, Llama's q/k permuted."""
    if arch == "gpt2" and hf_name.endswith(GPT2_CONV1D):
        t = t.t().contiguous()  # Conv1D (in, out) -> (out, in)
    if arch == "llama":
        if ".attn_q." in gguf_name:
            t = permute_rope(t, n_head)
        elif ".attn_k." in gguf_name:
            t = permute_rope(t, n_kv)
    return t


def from_gguf_layout(arch: str, hf_name: str, gguf_name: str, w: torch.Tensor, hf_shape: torch.Size,
                     n_head: int, n_kv: int) -> torch.Tensor:
    """Inverse of :func:`to_gguf_layout`: a GGUF tensor (fp32) in the Hugging Face parameter's layout."""
    if arch == "gpt2" and hf_name.endswith(GPT2_CONV1D):
        w = w.reshape(hf_shape[::-1]).t()
    w = w.reshape(hf_shape)
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        w = unpermute_rope(w, n_head if ".attn_q." in gguf_name else n_kv)
    return w
