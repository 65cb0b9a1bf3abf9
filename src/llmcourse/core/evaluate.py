"""Evaluation shared by every lab: perplexity and next-token agreement with a reference.

Perplexity follows the Hugging Face recipe ("Perplexity of fixed-length models"): the
token stream is cut into windows of ``max_length`` tokens that start every ``stride``
tokens; each window scores only the tokens not scored by the previous one
(``trg_len = end - prev_end``), the first token of a window never being a target. With
``N`` scored tokens and ``log p`` the model's log-probabilities,

    PPL = exp( -(1/N) * sum_i log p(x_i | x_<i within its window) ).

The published recipe weights each window's *mean* loss by ``trg_len - 1`` (it subtracts
one token per window for the label shift) although the loss averages ``trg_len`` tokens
in every window but the first. With the default ``weighting="hf"`` we reproduce that
number (what people compare with); ``weighting="exact"`` gives the plain mean over every
scored token. The two differ by far less than 0.1% at the default stride (512) and more
with small strides. Ours equals the recipe within float rounding (tested to 1e-4
relative) but projects to the vocabulary only the positions it scores, and runs under
``torch.inference_mode``.

``compare`` runs a model and a reference on the same non-overlapping windows and reports
the mean KL divergence ``KL(P_ref || P_model)`` per token and the top-1 agreement (share
of positions where both argmaxes are equal), which the quantization labs report.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from llmcourse.core.errors import UserError
from llmcourse.core.progress import progress


def context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def _check_window(model: Any, max_length: int, stride: int) -> None:
    if max_length < 2:
        raise UserError(f"context length {max_length} is too small", "use --max-length >= 2")
    if not 1 <= stride <= max_length:
        raise UserError(f"stride {stride} must be between 1 and --max-length {max_length}", "change --stride")
    ctx = context_length(model)
    if ctx is not None and max_length > ctx:
        raise UserError(f"--max-length {max_length} exceeds the model's context of {ctx} tokens",
                        f"use --max-length {ctx} or less")


def _check_finite_result(what: str, value: float) -> None:
    """A NaN or infinite loss is never printed as a result: the model's outputs are not finite numbers."""
    if not math.isfinite(value):
        raise UserError(f"the {what} is {value} (the model's outputs hold NaN or infinite values)",
                        "check the model's weights (re-convert or re-quantize it)")


def _hidden_and_head(model: Any):
    """The model's trunk (returns hidden states) and its output head, when they can be split."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, "model", None) or getattr(model, "transformer", None)
    if head is None or trunk is None:
        return None, None
    return trunk, head


@torch.inference_mode()
def _window_logits(model: Any, ids: torch.Tensor, keep_last: int) -> torch.Tensor:
    """fp32 logits of the last ``keep_last`` positions of ``ids`` (1, T) -> (keep_last, V)."""
    trunk, head = _hidden_and_head(model)
    if trunk is not None:
        hidden = trunk(input_ids=ids, use_cache=False).last_hidden_state[0, -keep_last:]
        logits = head(hidden)
    else:
        logits = model(input_ids=ids, use_cache=False).logits[0, -keep_last:]
    return logits.float()


def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    max_length: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    weighting: str = "hf",
) -> dict[str, Any]:
    """Sliding-window perplexity of ``model`` on ``input_ids`` (1, n) (see module docstring).

    Returns ``perplexity``, ``nll`` (mean negative log-likelihood), ``tokens`` (scored),
    ``seconds`` and ``tokens_per_second``.
    """
    if weighting not in ("hf", "exact"):
        raise UserError(f"unknown weighting {weighting!r}", "use 'hf' or 'exact'")
    _check_window(model, max_length, stride)
    ids = input_ids.reshape(1, -1)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    seq_len = ids.size(1)
    if seq_len < 2:
        raise UserError("the text has fewer than 2 tokens", "pass a longer text")
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    hf_sum, hf_count = 0.0, 0
    t0 = time.perf_counter()
    starts = list(range(0, seq_len, stride))
    bar = progress(total=seq_len - 1, desc="perplexity", unit="tok")
    for begin in starts:
        end = min(begin + max_length, seq_len)
        if end - begin < 2:  # a last window of one token predicts nothing: give it the context before it
            begin = max(0, end - max_length)
        trg_len = end - prev_end
        window = ids[:, begin:end]
        n_pred = min(trg_len, end - begin - 1)  # the window's first token is never a target
        logits = _window_logits(model, window[:, :-1], n_pred)
        targets = window[0, -n_pred:]
        window_sum = F.cross_entropy(logits, targets, reduction="sum").item()
        nll_sum += window_sum
        n_scored += n_pred
        hf_sum += window_sum / n_pred * (trg_len - 1)
        hf_count += trg_len - 1
        bar.update(n_pred)
        prev_end = end
        if end == seq_len:
            break
    bar.close()
    dt = time.perf_counter() - t0
    nll = hf_sum / hf_count if weighting == "hf" and hf_count > 0 else nll_sum / n_scored
    _check_finite_result("perplexity", nll)
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": n_scored,
        "max_length": max_length,
        "stride": stride,
        "weighting": weighting,
        "seconds": dt,
        "tokens_per_second": n_scored / dt if dt > 0 else float("inf"),
    }


def compare(
    model: Any,
    reference: Any,
    input_ids: torch.Tensor,
    max_length: int = 512,
    max_tokens: int | None = 4096,
) -> dict[str, Any]:
    """Mean KL(P_ref || P_model) per token and top-1 agreement on the same windows."""
    _check_window(model, max_length, max_length)
    ids = input_ids.reshape(1, -1)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    if ids.size(1) < 2:
        raise UserError("the text has fewer than 2 tokens", "pass a longer text")
    kl_sum, agree, n = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = progress(total=ids.size(1), desc="compare", unit="tok")
    for begin in range(0, ids.size(1) - 1, max_length):
        window = ids[:, begin:begin + max_length]
        if window.size(1) < 1:
            break
        k = window.size(1)
        lp = F.log_softmax(_window_logits(model, window, k), -1)
        lq = F.log_softmax(_window_logits(reference, window, k), -1)
        kl_sum += (lq.exp() * (lq - lp)).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += k
        bar.update(k)
    bar.close()
    dt = time.perf_counter() - t0
    _check_finite_result("KL divergence", kl_sum / n)
    return {
        "kl_divergence": kl_sum / n,
        "top1_agreement": agree / n,
        "tokens": n,
        "seconds": dt,
        "tokens_per_second": n / dt if dt > 0 else float("inf"),
    }
