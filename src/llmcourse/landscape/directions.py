"""Directions in weight space for loss landscapes (Li, Xu, Taylor, Studer, Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets").

A direction ``d`` holds one tensor per perturbed parameter ``θ_i`` (tied tensors once: a tied
embedding and head are one parameter, perturbed once). Random directions are Gaussian,
``d_i ~ N(0, I)`` from ``torch.Generator().manual_seed(seed)``, then normalised:

* ``filter`` (Li et al.): each output row ``j`` of ``d_i`` is rescaled to the norm of the weight's row,
  ``d_i[j] ← d_i[j] / ‖d_i[j]‖ · ‖θ_i[j]‖`` (a row of a linear layer is one output neuron's filter; for
  GPT-2's ``Conv1D``, stored (in, out), the filter is a column, so rows are taken of the (out, in) view);
* ``layer`` (the course notebook's): per tensor, ``d_i ← d_i / ‖d_i‖ · ‖θ_i‖``;
* ``none``: raw Gaussian.

``ignore='biasbn'`` zeroes the directions of 1-D parameters (biases, norm weights), as Li et al.
The direction towards another model of the same architecture is ``d_i = θ_i^B − θ_i^A`` (no
normalisation), so ``θ_A + 1·d = θ_B`` and the line ``α ∈ [0, 1]`` interpolates the two models.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcourse.core.errors import UserError
from llmcourse.core.modules import is_linear

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")

Direction = dict[str, torch.Tensor]


def perturbed_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every distinct parameter tensor (``named_parameters`` lists a tied one once)."""
    return dict(model.named_parameters())


def _transposed_names(model: nn.Module) -> set[str]:
    """Names of weights stored (in, out) — GPT-2's ``Conv1D`` — whose filters are columns."""
    return {f"{n}.weight" for n, m in model.named_modules() if is_linear(m) and not isinstance(m, nn.Linear)}


def normalize_(d: torch.Tensor, w: torch.Tensor, norm: str, transposed: bool = False) -> torch.Tensor:
    """Rescale direction ``d`` in place against weight ``w`` (see the module docstring)."""
    if norm == "none":
        return d
    if norm == "layer" or d.dim() <= 1:
        return d.mul_(w.norm() / (d.norm() + 1e-10))
    dv, wv = (d.t(), w.t()) if transposed else (d, w)
    dv, wv = dv.reshape(dv.shape[0], -1), wv.reshape(wv.shape[0], -1)  # (out, fan_in)
    scale = wv.norm(dim=1, keepdim=True) / (dv.norm(dim=1, keepdim=True) + 1e-10)
    if transposed:
        d.mul_(scale.reshape(1, -1))
    else:
        d.mul_(scale.reshape([-1] + [1] * (d.dim() - 1)))
    return d


def random_direction(model: nn.Module, seed: int = 0, norm: str = "filter", ignore: str = "biasbn") -> Direction:
    """A seeded Gaussian direction over ``model``'s parameters, on their device and dtype, normalised."""
    if norm not in NORMS:
        raise UserError(f"unknown normalisation {norm!r}", f"use one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise UserError(f"unknown --ignore {ignore!r}", f"use one of {', '.join(IGNORES)}")
    g = torch.Generator().manual_seed(seed)
    transposed = _transposed_names(model)
    out: Direction = {}
    for name, p in perturbed_parameters(model).items():
        w = p.detach()
        if ignore == "biasbn" and w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        out[name] = normalize_(d, w, norm, name in transposed)
    return out


def direction_to(model: nn.Module, other: nn.Module | dict[str, torch.Tensor]) -> Direction:
    """``θ_other − θ_model`` per parameter: the direction from ``model`` to a model of the same shapes."""
    mine = perturbed_parameters(model)
    theirs = other if isinstance(other, dict) else {n: p.detach() for n, p in perturbed_parameters(other).items()}
    missing = sorted(set(mine) - set(theirs))
    if missing or len(theirs) != len(mine):
        extra = sorted(set(theirs) - set(mine))
        raise UserError(f"the models have different parameters (missing {missing[:3]}, extra {extra[:3]})",
                        "pass models of the same architecture (de-quantize a quantized one first)")
    out: Direction = {}
    for name, p in mine.items():
        t = theirs[name]
        if t.shape != p.shape:
            raise UserError(f"parameter {name} has shape {tuple(t.shape)} in the other model, "
                            f"{tuple(p.shape)} here", "pass models of the same architecture and size")
        out[name] = t.detach().to(device=p.device, dtype=p.dtype) - p.detach()
    return out
