"""What differs between the decoder-only architectures the runtime runs, read from a transformers config.

Every supported model is the same pre-norm decoder layer (Vaswani et al. 2017, as Llama writes it)

    h = x + P(W_o · attn(rope(N_q(W_q · n1(x))), rope(N_k(W_k · n1(x))), W_v · n1(x)))
    y = h + P'(W_down · (act(W_gate · n2(h)) * (W_up · n2(h))))

and an architecture is the choice of its parts:

| model_type   | q/k norms N_q N_k | sandwich norms P P' | act      | other                                     |
|--------------|-------------------|---------------------|----------|-------------------------------------------|
| llama        | -                 | -                   | silu     | Llama 3's rope scaling (in HF's tables)   |
| mistral      | -                 | -                   | silu     | sliding window (all layers) if configured |
| qwen2        | -                 | -                   | silu     | q/k/v biases; sliding layers if enabled   |
| qwen3        | RMSNorm per head  | -                   | silu     | sliding layers if enabled                 |
| smollm3      | -                 | -                   | silu     | NoPE layers (``no_rope_layers``)          |
| phi3         | -                 | -                   | silu     | fused qkv and gate_up; partial rotary     |
| gemma3_text  | RMSNorm per head  | yes                 | gelu-tanh| norms scale by 1 + w; embeddings x sqrt(H); |
|              |                   |                     |          | 5 sliding : 1 global layers, two rope bases; |
|              |                   |                     |          | attention scale query_pre_attn_scalar^-1/2 |

:func:`arch_of` reads these from the config; :func:`check_supported` refuses anything else in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmcourse.core.errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "gemma3_text")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu": "gelu"}


@dataclass(frozen=True)
class LayerKind:
    """Per layer: its sliding window (keys within ``window`` positions of the query, or None: all) and its
    RoPE table (a key of :attr:`Arch.rope_tables`, or None for a NoPE layer)."""

    window: int | None
    rope: str | None


@dataclass(frozen=True)
class Arch:
    """The shape and the parts of one model (see the module docstring)."""

    model_type: str
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    act: str  # "silu" | "gelu_tanh" | "gelu"
    qk_norm: bool
    sandwich_norms: bool
    norm_offset: float  # the norms multiply by (offset + w): 1.0 for Gemma, else 0.0
    attn_scale: float
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial rotary); the rest pass through
    attn_softcap: float | None
    final_softcap: float | None
    layers: tuple[LayerKind, ...]

    @property
    def rope_tables(self) -> tuple[str, ...]:
        """The RoPE tables the layers use (one per base frequency / scaling)."""
        return tuple(sorted({k.rope for k in self.layers if k.rope is not None}))

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct attention windows of the layers (one mask each per step)."""
        return tuple(sorted({k.window for k in self.layers}, key=lambda w: -1 if w is None else w))


def model_type(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def supports(model: Any) -> bool:
    """Whether the runtime can run ``model`` (a transformers causal LM of a :data:`SUPPORTED` type)."""
    inner = getattr(model, "model", None)
    return model_type(model) in SUPPORTED and hasattr(inner, "layers") and hasattr(model, "lm_head")


def check_supported(model_type_: str | None) -> None:
    """One line naming the supported architectures for anything else."""
    if model_type_ not in SUPPORTED:
        raise UserError(f"architecture {model_type_!r} is not supported (supported: {', '.join(SUPPORTED)})",
                        "use a model of a supported architecture")


def _layer_types(cfg: Any, n: int) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    return list(types) if types else ["full_attention"] * n


def arch_of(model: Any) -> Arch:
    """The :class:`Arch` of a transformers causal LM of a supported type."""
    cfg = model.config
    mt = cfg.model_type
    check_supported(mt)
    n = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    act_name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise UserError(f"activation {act_name!r} is not supported", f"use one of {sorted(ACTIVATIONS)}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    types = _layer_types(cfg, n)
    sliding = getattr(cfg, "sliding_window", None)
    kinds = []
    for i, t in enumerate(types):
        if mt == "gemma3_text":
            kinds.append(LayerKind(sliding if t == "sliding_attention" else None, t))
            continue
        if mt in ("mistral", "phi3"):
            window = sliding  # these apply the config's window to every layer
        elif mt in ("qwen2", "qwen3", "smollm3"):
            on = getattr(cfg, "use_sliding_window", False)
            window = sliding if on and t == "sliding_attention" else None
        else:
            window = None
        use_rope = True
        if mt == "smollm3":
            use_rope = bool(cfg.no_rope_layers[i])
        kinds.append(LayerKind(window, "default" if use_rope else None))
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
    if mt == "gemma3_text":
        partial = 1.0
    gemma = mt == "gemma3_text"
    return Arch(
        model_type=mt, n_heads=n_heads, n_kv=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, eps=cfg.rms_norm_eps, act=ACTIVATIONS[act_name],
        qk_norm=mt in ("qwen3", "gemma3_text"), sandwich_norms=gemma, norm_offset=1.0 if gemma else 0.0,
        attn_scale=(cfg.query_pre_attn_scalar ** -0.5) if gemma else head_dim ** -0.5,
        rotary_dim=int(head_dim * (partial or 1.0)),
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        layers=tuple(kinds))
