"""Structured pruning that really shrinks the model: whole decoder layers (depth) or MLP neurons (width).

*Depth* (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; Men et al. 2024,
ShortGPT's "block influence"): a pre-norm decoder layer adds its output to the residual stream, so a
layer whose output hidden state ``h_out`` points the same way as its input ``h_in`` changes little. Its
redundancy is the mean cosine similarity over calibration tokens,

    s_l = mean_t  <h_in,t , h_out,t> / (||h_in,t|| ||h_out,t||)

and the ``K`` layers with the highest ``s_l`` are removed (one shot, from the unpruned model's
activations, which run block by block: one block's activations at a time). Gromov et al.'s criterion
instead removes one contiguous run of ``n`` layers, the one whose input and output are closest by the
angular distance

    d(l, n) = mean_t  arccos(cos(h_l,t , h_{l+n},t)) / π          (h_l: the input of layer l)

and ``l* = argmin_l d(l, n)`` (they score the last token of each window; we average over every token).

*Width* (Minitron, Muralidharan et al. 2024 / Sreenivas et al. 2024, "activation-based importance"): the
importance of MLP neuron ``j`` (a row of ``gate_proj``/``up_proj``, a column of ``down_proj``) is the
norm of its activation over the calibration tokens, ``I_j = ||a_j||_2`` (``a`` = the input of
``down_proj``: ``act(gate x) * up x``); each layer keeps its ``round(F · intermediate)`` most important
neurons (the same count in every layer, as the config has one ``intermediate_size``), in their original
order. Removing a neuron removes its row of gate/up and its column of down: the result equals the
original with those neurons' activations forced to zero, with smaller matrices.

Attention heads are not pruned here (with grouped-query attention a head can only go with its whole
key/value group).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from llmcourse.core.errors import UserError
from llmcourse.core.modules import block_inputs, decoder_blocks, input_hooks, run_block
from llmcourse.core.progress import progress

log = logging.getLogger(__name__)


def parse_layers(text: str, n_layers: int) -> tuple[int, list[int] | None]:
    """``"K"`` -> (K, None): drop K layers chosen by similarity; ``"i,j,..."`` -> (count, sorted indices).

    One-line errors for dropping every layer (or none), bad or repeated indices."""
    text = text.strip()
    try:
        if "," in text:
            idx = sorted({int(t) for t in text.split(",") if t.strip()})
            count = len(idx)
        else:
            idx, count = None, int(text)
    except ValueError:
        raise UserError(f"--drop-layers {text!r} is neither a count nor a list of indices",
                        "pass a count (e.g. 8) or indices separated by commas (e.g. 20,21,22)") from None
    if idx is not None and any(not 0 <= i < n_layers for i in idx):
        raise UserError(f"layer indices {text} are outside 0..{n_layers - 1}", f"the model has {n_layers} layers")
    if count < 1:
        raise UserError(f"dropping {count} layers prunes nothing", "drop at least one layer")
    if count >= n_layers:
        raise UserError(f"dropping {count} of the model's {n_layers} layers leaves none",
                        f"drop at most {n_layers - 1} layers")
    return count, idx


@torch.no_grad()
def layer_similarities(model: nn.Module, windows: torch.Tensor) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output hidden states (per token)."""
    _, blocks = decoder_blocks(model)
    inputs = block_inputs(model, windows)
    sims: list[float] = []
    bar = progress(total=len(blocks), desc="layer similarity", unit="block")
    for block in blocks:
        total, n = 0.0, 0
        for inp in inputs:
            out = run_block(block, inp)
            cos = torch.nn.functional.cosine_similarity(inp.hidden.float(), out.float(), dim=-1)  # (1, T)
            total, n = total + float(cos.sum()), n + cos.numel()
            inp.hidden = out
        sims.append(total / max(1, n))
        bar.update(1)
    bar.close()
    return sims


@torch.no_grad()
def block_distances(model: nn.Module, windows: torch.Tensor, n: int) -> list[float]:
    """Gromov et al.'s angular distance ``d(l, n)`` between the input of layer ``l`` and the output of layer
    ``l + n - 1``, for every ``l`` in ``0 .. L - n`` (keeps ``n + 1`` layers' hidden states at a time)."""
    _, blocks = decoder_blocks(model)
    if not 1 <= n < len(blocks):
        raise UserError(f"a run of {n} of the model's {len(blocks)} layers", f"drop 1 to {len(blocks) - 1} layers")
    inputs = block_inputs(model, windows)
    states = [[inp.hidden for inp in inputs]]  # states[j]: the input of layer j (the last n + 1 kept)
    dist: list[float] = []
    bar = progress(total=len(blocks), desc="block distance", unit="block")
    for block in blocks:
        for inp in inputs:
            inp.hidden = run_block(block, inp)
        states.append([inp.hidden for inp in inputs])
        if len(states) == n + 1:
            total, count = 0.0, 0
            for a, b in zip(states[0], states[-1], strict=True):
                cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1, 1)  # (1, T)
                total, count = total + float(torch.arccos(cos).sum() / math.pi), count + cos.numel()
            dist.append(total / max(1, count))
            states.pop(0)
        bar.update(1)
    bar.close()
    return dist


def choose_block(dist: list[float], n: int) -> list[int]:
    """The ``n`` contiguous layers ``l*, ..., l* + n - 1`` with the smallest angular distance ``d(l*, n)``."""
    start = min(range(len(dist)), key=lambda i: dist[i])
    return list(range(start, start + n))


def choose_layers(sims: list[float], k: int) -> list[int]:
    """The ``k`` layers whose output is most similar to their input (sorted indices)."""
    order = sorted(range(len(sims)), key=lambda i: -sims[i])
    return sorted(order[:k])


def drop_layers(model: nn.Module, drop: list[int]) -> dict[str, Any]:
    """Remove the decoder layers ``drop`` in place, renumber the rest, update the config."""
    prefix, blocks = decoder_blocks(model)
    n = len(blocks)
    if len(set(drop)) >= n:
        raise UserError(f"dropping {len(set(drop))} of {n} layers leaves none", f"drop at most {n - 1}")
    keep = [i for i in range(n) if i not in set(drop)]
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(new):  # the KV cache is indexed by the layer's position
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    parent_name, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for key in ("layer_types",):  # per-layer lists in the config follow the layers kept
        v = getattr(cfg, key, None)
        if isinstance(v, list) and len(v) == n:
            setattr(cfg, key, [v[i] for i in keep])
    return {"dropped": sorted(set(drop)), "kept": keep, "layers_before": n, "layers_after": len(keep)}


# --------------------------------------------------------------------------------------------
# Width: MLP neurons
# --------------------------------------------------------------------------------------------


def _mlp_parts(block: nn.Module) -> tuple[list[nn.Module], nn.Module, str]:
    """(layers whose output rows are neurons, the layer whose input columns are neurons, config key)."""
    mlp = getattr(block, "mlp", None)
    if mlp is not None and all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj, "intermediate_size"
    if mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 (Conv1D)
        return [mlp.c_fc], mlp.c_proj, "n_inner"
    raise UserError(f"cannot find the MLP of {type(block).__name__}", "width pruning supports Llama/Qwen2/GPT-2 MLPs")


@torch.no_grad()
def mlp_importance(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer, ``||a_j||_2`` of each MLP neuron over the calibration tokens (intermediate,)."""
    _, blocks = decoder_blocks(model)
    inputs = block_inputs(model, windows)
    out: list[torch.Tensor] = []
    bar = progress(total=len(blocks), desc="neuron importance", unit="block")
    for block in blocks:
        _, down, _ = _mlp_parts(block)
        acc: list[torch.Tensor] = []

        def add(_n: str, x: torch.Tensor, acc: list[torch.Tensor] = acc) -> None:
            s = x.float().pow(2).sum(0)
            if acc:
                acc[0] += s
            else:
                acc.append(s)

        with input_hooks({"down": down}, add):
            for inp in inputs:
                inp.hidden = run_block(block, inp)
        out.append(acc[0].sqrt())
        bar.update(1)
    bar.close()
    return out


def _keep_rows(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` of an ``nn.Linear`` (rows) or a ``Conv1D`` (columns of its (in, out) weight)."""
    if isinstance(m, nn.Linear):
        m.weight = nn.Parameter(m.weight.data[idx].contiguous())
        m.out_features = len(idx)
    else:
        m.weight = nn.Parameter(m.weight.data[:, idx].contiguous())
        m.nf = len(idx)
    if getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(m.bias.data[idx].contiguous())


def _keep_columns(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` of an ``nn.Linear`` (columns) or a ``Conv1D`` (rows of its weight)."""
    if isinstance(m, nn.Linear):
        m.weight = nn.Parameter(m.weight.data[:, idx].contiguous())
        m.in_features = len(idx)
    else:
        m.weight = nn.Parameter(m.weight.data[idx].contiguous())


def shrink_mlp(model: nn.Module, importance: list[torch.Tensor], keep_fraction: float) -> dict[str, Any]:
    """Keep each layer's ``round(keep_fraction · intermediate)`` most important MLP neurons, in place."""
    if not 0 < keep_fraction < 1:
        raise UserError(f"--width must be in (0, 1) (got {keep_fraction})", "pass the fraction of MLP neurons to keep, "
                        "e.g. --width 0.75")
    _, blocks = decoder_blocks(model)
    before = int(importance[0].numel())
    k = max(1, round(keep_fraction * before))
    key = ""
    for block, imp in zip(blocks, importance, strict=True):
        rows, down, key = _mlp_parts(block)
        idx = torch.sort(torch.topk(imp, k).indices).values
        for m in rows:
            _keep_rows(m, idx)
        _keep_columns(down, idx)
    setattr(model.config, key, k)
    return {"intermediate_before": before, "intermediate_after": k, "keep_fraction": keep_fraction}


def n_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor once (a tied head is not counted twice)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
