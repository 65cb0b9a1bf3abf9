"""Lab: loss landscapes — 1-D lines and 2-D planes of a language model's loss (Li et al. 2018), and the
path between two or three real models.

* ``directions`` — random Gaussian directions with filter / layer / no normalisation, ``ignore='biasbn'``,
  and directions towards other models (``d = θ_B − θ_A``);
* ``surface`` — the exact sweep: each point sets ``w = w0 + a·d1 + b·d2`` from a kept copy, restores the
  weights bit for bit on exit, resumes a partial grid; a grid row per forward (the weights read once per row);
* ``plots`` — matplotlib contour / surface / line PNGs and a self-contained plotly HTML when plotly is present;
* ``commands`` (``llmcourse landscape``) and ``tour`` (the tour section).

Public API (imported lazily)::

    from llmcourse.landscape import random_direction, direction_to, sweep_grid, sweep_line
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="landscape",
    title="Loss landscapes",
    commands={"landscape": "loss along a line or over a plane of weight space (random or towards other models)"},
    commands_module="llmcourse.landscape.commands",
    tour="llmcourse.landscape.tour:section",
    docs="docs/landscape.md",
)

_PUBLIC = {
    "directions": ("perturbed_parameters", "random_direction", "direction_to", "NORMS"),
    "surface": ("LossFn", "WindowLoss", "batched_loss", "loss_on", "Perturbation", "PointBatch", "sweep_grid",
                "sweep_line", "flatness"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
