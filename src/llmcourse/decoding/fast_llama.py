"""A lean Llama-family forward for CPU decoding: static KV cache, transposed weights, little Python.

Same maths as transformers' ``LlamaForCausalLM`` (Touvron et al. 2023, "LLaMA"), written for
one-token steps:

    h = x + W_o · attn(RoPE(W_q · n1(x)), RoPE(W_k · n1(x)), W_v · n1(x))
    y = h + W_down · (silu(W_gate · n2(h)) * (W_up · n2(h)))
    n(x) = w * x / sqrt(mean(x^2) + eps)                        (RMSNorm, Zhang & Sennrich 2019)
    RoPE(q)_t = q * cos(t * theta) + rotate_half(q) * sin(t * theta)   (Su et al. 2021)
    attn(q, K, V) = softmax(q K^T / sqrt(d)) V, grouped-query: each of the n_kv key/value
                    heads serves n_heads / n_kv query heads (Ainslie et al. 2023, GQA)

Why it is faster than ``model.generate`` on a CPU: a one-row product ``x @ W.T`` with the usual
``(out, in)`` layout runs on one core at about half the memory bandwidth, while ``x @ Wt`` with
``Wt`` stored ``(in, out)`` and contiguous streams at full bandwidth (shared/MACHINE.md); q/k/v and
gate/up are fused into one product each; the KV cache is a preallocated tensor written in
place; and a step is ~15 tensor operations per layer, with no masks, cache objects or hooks.

Plug-in rule (for the 8-bit lab): a projection that is a plain ``nn.Linear`` gets the fast
transposed layout; any other module (e.g. an int8 linear) is called as ``module(x)``, so a model
whose linears were swapped runs through this same path with its own kernels.

Supported: ``model_type`` in :data:`SUPPORTED` (Llama, Qwen2 — q/k/v biases are handled; Mistral
without a sliding window). Logits match transformers within 1e-4 absolute in fp32 (tested): the
products run in a different order, so they are not bit-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "mistral")


def _rowdot(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, in) . (in,) -> (out,): one pass over ``w``, rows summed in registers once compiled."""
    return (w * x).sum(-1)


_COMPILED_ROWDOT: list[Any] = []


def compiled_rowdot() -> Any:
    """``torch.compile``'d :func:`_rowdot` (one specialisation per weight shape; a model has ~5)."""
    if not _COMPILED_ROWDOT:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _COMPILED_ROWDOT.append(torch.compile(_rowdot, dynamic=False))
    return _COMPILED_ROWDOT[0]


MATVECS = ("mm", "compiled")
SMALL_BATCH = 8  # up to this many rows (beams) run as one-row products


class Projection:
    """``y = x W^T + b`` for plain ``nn.Linear`` modules (fused along the outputs), else ``module(x)``.

    ``matvec="mm"`` stores ``Wt = W^T`` contiguous and runs ``x @ Wt`` (full bandwidth for one row,
    a plain GEMM for several). ``matvec="compiled"`` keeps ``W`` as ``(out, in)`` and runs one row
    through a compiled row-wise dot product (the fastest fp32 one-row kernel measured on this CPU,
    shared/MACHINE.md), several rows through ``F.linear``.
    """

    def __init__(self, modules: list[nn.Module], matvec: str = "mm") -> None:
        self.fused = all(type(m) is nn.Linear for m in modules)
        self.sizes = [getattr(m, "out_features", None) for m in modules]
        self.matvec = matvec
        self.w = self.wt = self.bias = None
        self.modules: list[nn.Module] = []
        if not self.fused:
            self.modules = modules
            return
        w = torch.cat([m.weight.detach() for m in modules], dim=0) if len(modules) > 1 else modules[0].weight.detach()
        if matvec == "compiled":
            self.w = w.contiguous()  # (out, in)
            self._rowdot = compiled_rowdot()
        else:
            self.wt = w.t().contiguous()  # (in, out): streams at full bandwidth for one row
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype)
                                   for m in modules])

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        """(1, in) -> (1, out) at full memory bandwidth."""
        return x @ self.wt if self.wt is not None else self._rowdot(self.w, x[0]).unsqueeze(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.fused:
            outs = [m(x) for m in self.modules]
            return outs[0] if len(outs) == 1 else outs
        rows = x.shape[0] if x.dim() == 2 else 0
        if 1 < rows <= SMALL_BATCH:
            # beams: one-row products, row by row. MKL's GEMM for 2-8 rows was 1.8x slower here
            # than 4 separate one-row passes over the weight (36 ms vs 20 ms for the 49152 x 576 head).
            y = torch.cat([self._one_row(x[i:i + 1]) for i in range(rows)])
        elif rows == 1:
            y = self._one_row(x)
        else:
            y = x @ self.wt if self.wt is not None else F.linear(x, self.w)
        if self.bias is not None:
            y = y + self.bias
        return y if len(self.sizes) == 1 else list(y.split(self.sizes, dim=-1))


@dataclass
class Layer:
    n1: torch.Tensor  # input RMSNorm weight (H,)
    qkv: Projection
    o: Projection
    n2: torch.Tensor  # post-attention RMSNorm weight (H,)
    gate_up: Projection
    down: Projection


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (the variance in fp32)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastLlama:
    """Our forward of a Llama-family HF model with a static KV cache (see module docstring).

    Use :meth:`prefill` once with the prompt, then :meth:`step` per new token; :meth:`expand` and
    :meth:`reorder` serve beam search. The weights are shared with (or transposed copies of) the
    HF model's; the HF model is not modified.
    """

    def __init__(self, model: nn.Module, matvec: str = "mm") -> None:
        if matvec not in MATVECS:
            raise ValueError(f"matvec must be one of {MATVECS}, not {matvec!r}")
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise ValueError(f"FastLlama supports {SUPPORTED}, not {getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by FastLlama")
        self.config = cfg
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens
        self.dtype = self.embed.weight.dtype
        self.layers = []
        for blk in inner.layers:
            a, m = blk.self_attn, blk.mlp
            self.layers.append(Layer(
                n1=blk.input_layernorm.weight.detach(),
                qkv=Projection([a.q_proj, a.k_proj, a.v_proj], matvec), o=Projection([a.o_proj], matvec),
                n2=blk.post_attention_layernorm.weight.detach(),
                gate_up=Projection([m.gate_proj, m.up_proj], matvec), down=Projection([m.down_proj], matvec)))
        self.norm = inner.norm.weight.detach()
        self.lm_head = Projection([model.lm_head], matvec)
        self.matvec = matvec
        self.rotary = inner.rotary_emb
        self.cos = self.sin = None  # (L, head_dim) tables, grown on demand
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.pos = 0
        self.capacity = 0

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # --- cache ---------------------------------------------------------------------------------
    def _rope_tables(self, n: int) -> None:
        if self.cos is not None and self.cos.shape[0] >= n:
            return
        pos = torch.arange(n).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype), pos)
        self.cos, self.sin = cos[0], sin[0]  # (n, head_dim)

    def reset(self, batch: int, capacity: int) -> None:
        """Allocate an empty cache for ``batch`` rows and ``capacity`` positions."""
        shape = (batch, self.n_kv, capacity, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.pos, self.capacity = 0, capacity
        self._rope_tables(capacity)

    def expand(self, n: int) -> None:
        """Repeat a one-row cache into ``n`` rows (beam search after the prompt)."""
        self.k_cache = [k.expand(n, -1, -1, -1).contiguous() for k in self.k_cache]
        self.v_cache = [v.expand(n, -1, -1, -1).contiguous() for v in self.v_cache]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (B,), in that order (beam search)."""
        if torch.equal(rows, torch.arange(rows.shape[0])):
            return
        self.k_cache = [k.index_select(0, rows) for k in self.k_cache]
        self.v_cache = [v.index_select(0, rows) for v in self.v_cache]

    # --- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (B, T) at the next T positions; return the last position's logits (B, V) in fp32."""
        b, t = ids.shape
        p0 = self.pos
        if p0 + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {p0 + t}")
        cos, sin = self.cos[p0:p0 + t], self.sin[p0:p0 + t]  # (T, hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids)  # (B, T, H)
        if t == 1:
            x = x[:, 0]  # (B, H): one-row products, the decode hot path
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.n1, self.eps)
            q, k, v = layer.qkv(h)
            q = q.view(b, t, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(b, t, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
            v = v.view(b, t, nkv, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[:, :, p0:p0 + t] = k
            vc[:, :, p0:p0 + t] = v
            keys, values = kc[:, :, :p0 + t], vc[:, :, :p0 + t]  # (B, nkv, P, hd)
            if t == 1:
                # grouped-query attention without repeating K/V: fold the query groups into rows
                # grouped-query attention without repeating K/V: fold the query groups into rows.
                # Broadcast products and small reductions instead of bmm/softmax: for these tiny
                # sizes they stay on one thread, which avoids a thread fork/join per op.
                qg = q.view(b, nkv, nh // nkv, 1, hd)  # (B, nkv, g, 1, hd)
                s = (qg * keys.unsqueeze(2)).sum(-1) * self.scale  # (B, nkv, g, P)
                e = (s - s.amax(-1, keepdim=True)).exp()
                att = e / e.sum(-1, keepdim=True)
                y = (att.unsqueeze(-1) * values.unsqueeze(2)).sum(-2).reshape(b, nh * hd)  # (B, nh*hd)
            else:
                y = F.scaled_dot_product_attention(q, keys, values, is_causal=p0 == 0, scale=self.scale,
                                                   enable_gqa=nh != nkv)  # (B, nh, T, hd)
                y = y.transpose(1, 2).reshape(b, t, nh * hd)
            x = x + layer.o(y)
            h = rms_norm(x, layer.n2, self.eps)
            gate, up = layer.gate_up(h)
            x = x + layer.down(F.silu(gate) * up)
        self.pos = p0 + t
        last = x if t == 1 else x[:, -1]
        return self.lm_head(rms_norm(last, self.norm, self.eps)).float()

    def prefill(self, ids: torch.Tensor, capacity: int) -> torch.Tensor:
        """Start a sequence: allocate the cache for ``capacity`` positions and run the prompt (B, T)."""
        self.reset(ids.shape[0], capacity)
        return self.forward(ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> logits (B, V)."""
        return self.forward(tokens.view(-1, 1))


def supports(model: Any) -> bool:
    """Whether :class:`FastLlama` can run ``model``."""
    cfg = getattr(model, "config", None)
    return (cfg is not None and getattr(cfg, "model_type", None) in SUPPORTED and hasattr(model, "model")
            and hasattr(model.model, "layers") and not (getattr(cfg, "use_sliding_window", False)
                                                        and getattr(cfg, "sliding_window", None)))
