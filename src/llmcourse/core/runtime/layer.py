"""THE decoder layer: the one definition of a layer's forward that every path runs.

Single-sequence decoding, beam search, the batch server's prefill and steps, eager and compiled, float and
quantized weights: all call :func:`decoder_layer` (then :func:`head`). What differs between those paths is
only what they pass in:

* ``x`` (B, T, H): a prompt chunk (T tokens) or one new token per row (T = 1);
* the cache ``kc``/``vc`` (R, n_kv, W, hd) — the positions a query may see, a view of the session's static
  cache — and where the new keys go: every row at the same positions ``pos`` (T,), or, with ``rows``
  (B,), row ``b``'s one token into cache row ``rows[b]`` at its own position ``pos[b]`` (a batch of slots);
* ``rope``: the (cos, sin) rows of the tokens' positions, shaped to broadcast over (B, heads, T, rd),
  or None for a NoPE layer; ``mask`` (B | 1, 1, T, W): 0 where a query may see a key, -inf elsewhere
  (causal, and within the layer's sliding window: :func:`attention_mask`);
* the weights (:class:`LayerWeights`) in any kind of :mod:`~llmcourse.core.runtime.weights`.

The maths, with the parts an :class:`~llmcourse.core.runtime.arch.Arch` switches on or off::

    n(x) = (o + w) · x / sqrt(mean(x²) + eps)                    RMSNorm (Zhang & Sennrich 2019); o = 1 for Gemma
    q, k, v = W_q n1(x), W_k n1(x), W_v n1(x)                   (+ biases; one fused W_qkv for Phi-3)
    q, k = n_q(q), n_k(k)  per head                              (Qwen3, Gemma 3)
    RoPE(q)_t = q cos(tθ) + rotate_half(q) sin(tθ)              (Su et al. 2021; first ``rotary_dim`` dims)
    attn = softmax(q Kᵀ · scale + mask) V, each of n_kv K/V heads serving n_heads / n_kv query heads (GQA)
    x' = x + P(W_o attn);  y = x' + P'(W_down (act(W_gate n2(x')) * W_up n2(x')))   P, P': Gemma's norms
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmcourse.core.runtime.arch import Arch
from llmcourse.core.runtime.weights import Weight, project, project_many

FEW_QUERIES = 16  # a compiled step with up to this many tokens per row takes the few-token forms (attention, product)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's tensors. ``qkv`` is (W_q, W_k, W_v) or one fused weight; ``gate_up`` is (W_gate, W_up) or
    one fused weight. Norm weights are the effective ones (``offset + w``); optional norms are None."""

    n1: torch.Tensor
    qkv: tuple[Weight, ...]
    o: Weight
    n2: torch.Tensor
    gate_up: tuple[Weight, ...]
    down: Weight
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, op for op (the variance in fp32)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for ``x = (x1, x2)`` along the last dimension (RoPE's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head of ``x`` (B, heads, T, hd); the rest pass through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def attention_mask(pos: torch.Tensor, width: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B | 1, 1, T, W) for queries at positions ``pos`` (B | 1, T) over cache positions
    ``0 .. width-1``: 0 where key ``j <= p`` (causal) and ``p - j < window`` (a sliding window, as
    transformers' sliding-window mask), -inf elsewhere."""
    j = torch.arange(width).view(1, 1, width)
    p = pos.unsqueeze(-1)  # (B | 1, T, 1)
    seen = j <= p
    if window is not None:
        seen = seen & (p - j < window)
    return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf")).unsqueeze(1)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float | None = None) -> torch.Tensor:
    """``softmax(q Kᵀ · scale + mask) V`` with grouped-query heads: ``q`` (B, nh, T, hd), ``keys``/``values``
    (B, n_kv, W, hd), ``mask`` (B | 1, 1, T, W) -> (B, T, nh · hd).

    One query per row (a decode step), or a few under ``torch.compile`` (a multi-token step verifying
    drafted tokens): broadcast products and small reductions, folding the query groups into rows instead
    of repeating K/V — TorchInductor fuses them into a few loops (``scaled_dot_product_attention``'s CPU
    kernel cost ~0.6 ms a layer for 4 queries, a quarter of a whole step), and eagerly they stay on one
    thread for these tiny sizes. Many queries (a prompt): ``scaled_dot_product_attention``."""
    b, nh, t, hd = q.shape
    nkv = keys.shape[1]
    if t == 1 or softcap is not None or (t <= FEW_QUERIES and torch.compiler.is_compiling()):
        qg = q.reshape(b, nkv, nh // nkv, t, 1, hd)  # (B, n_kv, g, T, 1, hd)
        s = (qg * keys.unsqueeze(2).unsqueeze(3)).sum(-1) * scale  # (B, n_kv, g, T, W)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        att = torch.softmax(s + mask.unsqueeze(1), dim=-1)
        y = (att.unsqueeze(-1) * values.unsqueeze(2).unsqueeze(3)).sum(-2)  # (B, n_kv, g, T, hd)
        return y.reshape(b, nh, t, hd).transpose(1, 2).reshape(b, t, nh * hd)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=nh != nkv)
    return y.transpose(1, 2).reshape(b, t, nh * hd)


def write_cache(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new keys/values ``k``, ``v`` (B, n_kv, T, hd) into the cache, in place; return the keys
    and values each row attends over (B, n_kv, W, hd).

    Without ``rows``: every cache row takes its row's tokens at the same positions ``pos`` (T,). With
    ``rows`` (B,): row ``b``'s one token goes into cache row ``rows[b]`` at ``pos[b]`` (a batch of slots,
    each at its own position), and the rows are gathered (inside the attention's loops when compiled)."""
    if rows is None:
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc
    b, nkv = k.shape[:2]
    index = (rows.view(b, 1), torch.arange(nkv).view(1, nkv), pos.view(b, 1))  # (B, n_kv) each
    kc.index_put_(index, k[:, :, 0])
    vc.index_put_(index, v[:, :, 0])
    return kc[rows], vc[rows]


def _token_by_token(x: torch.Tensor) -> bool:
    """Whether a compiled multi-token step of ``x`` (B, T, I) takes its products one token at a time (:func:`product`)."""
    return x.dim() == 3 and 1 < x.shape[1] and x.shape[0] * x.shape[1] <= FEW_QUERIES and torch.compiler.is_compiling()


def product(w: Weight, x: torch.Tensor) -> torch.Tensor:
    """:func:`~llmcourse.core.runtime.weights.project` of ``x`` (B, T, I) or (B, I).

    Under ``torch.compile``, several tokens of one row (a multi-token step, 1 < T <= :data:`FEW_QUERIES`)
    are taken as one one-row product per token: TorchInductor fuses them into one pass over ``w`` that
    loads each weight vector once and meets every token with it (T accumulators). The tiled several-row
    product re-reads a tile per row from cache: on the default model, 4 tokens cost ~1.8x a one-token
    step that way and ~1.5x this way (the output head alone: 2x against 1.15x)."""
    if _token_by_token(x):
        rows = x.reshape(-1, x.shape[-1])
        y = torch.cat([project(w, rows[j:j + 1]) for j in range(rows.shape[0])])
        return y.view(*x.shape[:-1], y.shape[-1])
    return project(w, x)


def products(ws: tuple[Weight, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """:func:`product` of ``x`` by each of ``ws`` (q/k/v, gate/up): block weights in one kernel call
    (:func:`~llmcourse.core.runtime.weights.project_many`) unless :func:`product` takes a multi-token step
    token by token."""
    if _token_by_token(x):
        return [product(w, x) for w in ws]
    return project_many(ws, x)


def _qkv(ws: tuple[Weight, ...], h: torch.Tensor, sizes: tuple[int, int, int]) -> list[torch.Tensor]:
    """q, k, v of ``h``: one product each (block weights: one kernel call), or one fused product (Phi-3) split."""
    if len(ws) == 3:
        return products(ws, h)
    return list(product(ws[0], h).split(sizes, dim=-1))


def decoder_layer(x: torch.Tensor, lw: LayerWeights, arch: Arch, kc: torch.Tensor, vc: torch.Tensor,
                  pos: torch.Tensor, rows: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None,
                  mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer (see the module docstring): ``x`` (B, T, H) -> (B, T, H); writes K/V in place."""
    b, t, _ = x.shape
    nh, nkv, hd = arch.n_heads, arch.n_kv, arch.head_dim
    h = rms_norm(x, lw.n1, arch.eps)
    q, k, v = _qkv(lw.qkv, h, (nh * hd, nkv * hd, nkv * hd))
    q, k, v = q.view(b, t, nh, hd), k.view(b, t, nkv, hd), v.view(b, t, nkv, hd)
    if lw.q_norm is not None:
        q, k = rms_norm(q, lw.q_norm, arch.eps), rms_norm(k, lw.k_norm, arch.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys, values = write_cache(kc, vc, k, v, pos, rows)
    y = product(lw.o, attention(q, keys, values, mask, arch.attn_scale, arch.attn_softcap))
    if lw.post_attn is not None:
        y = rms_norm(y, lw.post_attn, arch.eps)
    x = x + y
    h = rms_norm(x, lw.n2, arch.eps)
    if len(lw.gate_up) == 2:
        gate, up = products(lw.gate_up, h)
    else:  # one fused product (Phi-3): gate then up
        gate, up = product(lw.gate_up[0], h).chunk(2, dim=-1)
    y = product(lw.down, activation(arch.act, gate) * up)
    if lw.post_mlp is not None:
        y = rms_norm(y, lw.post_mlp, arch.eps)
    return x + y


def head(x: torch.Tensor, norm: torch.Tensor, w: Weight, eps: float, softcap: float | None) -> torch.Tensor:
    """Final norm and output head: (B, H) -> fp32 logits (B, V), or (B, T, H) -> (B, T, V) (Gemma 2's final
    soft-capping if set)."""
    logits = product(w, rms_norm(x, norm, eps)).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
