"""Tour section of the loss-landscape lab: a filter-normalised 2-D grid around the default model
(Li et al. 2018) and the line from the default model to its de-quantized int8 version."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np

from llmcourse.core.report import TourContext, TourSection, html_table, img
from llmcourse.landscape.commands import eval_windows
from llmcourse.landscape.directions import direction_to, random_direction
from llmcourse.landscape.plots import contour_png, line_png
from llmcourse.landscape.surface import batched_loss, flatness, loss_on, sweep_grid, sweep_line

log = logging.getLogger(__name__)


def _int8_weights(model):
    """The default model's weights after row-wise absmax int8 (de-quantized), or None without that lab."""
    try:
        from llmcourse.quant.int8 import Int8Config, dequantize_model, quantize_model
    except ImportError:
        return None
    q = copy.deepcopy(model)
    quantize_model(q, Int8Config("absmax", "row"))
    return dequantize_model(q)


def section(ctx: TourContext) -> TourSection:
    """Quick mode: a 5x5 grid on one 16-token window and a 5-point line; full: 9x9 on 2 windows of 128."""
    lm = ctx.lm
    model = lm.model
    n, (windows, window), line_n = (5, (1, 16), 5) if ctx.quick else (9, (2, 128), 9)
    ids = eval_windows(lm.tokenizer, None, n_windows=windows, window=window)
    base = batched_loss(model, ids)
    xs = np.linspace(-1, 1, n)
    d1, d2 = random_direction(model, 0, "filter"), random_direction(model, 1, "filter")
    t0 = time.perf_counter()
    z, secs = sweep_grid(model, loss_on(ids), d1, d2, xs, xs, desc="landscape grid")
    grid_s = time.perf_counter() - t0
    del d1, d2
    contour_png(xs, xs, z, ctx.out_dir / "landscape_contour.png", "default model: filter-normalised plane")
    flat = flatness(xs, xs, z, base, 0.5)
    rows = [{"what": f"{n}x{n} grid, filter norm, range [-1, 1]", "base loss": base,
             "centre loss": float(z[n // 2, n // 2]), "max loss": float(z.max()),
             "mean rise at r=0.5": flat, "s / point": float(secs.mean())}]
    summary = {"grid": z.tolist(), "xs": xs.tolist(), "base_loss": base, "flatness_r0.5": flat,
               "seconds_per_point": float(secs.mean()), "grid_seconds": grid_s, "windows": list(ids.shape)}
    parts = [img("landscape_contour.png", "loss contour around the default model")]
    qw = _int8_weights(model)
    if qw is not None:
        d = direction_to(model, qw)
        q_loss = batched_loss(qw, ids)
        del qw
        ls = np.linspace(-0.5, 1.5, line_n)
        zl, sl = sweep_line(model, loss_on(ids), d, ls, desc="landscape line")
        line_png(ls, zl, ctx.out_dir / "landscape_int8_line.png", "default model -> its int8 (absmax, row)",
                 "α (0: fp32, 1: int8)", {"fp32": 0.0, "int8": 1.0})
        rows.append({"what": f"line fp32 -> int8, {line_n} points", "base loss": base,
                     "centre loss": float(zl[list(ls).index(0.0)]) if 0.0 in ls else None,
                     "max loss": float(zl.max()), "mean rise at r=0.5": None, "s / point": float(sl.mean())})
        summary.update(int8_loss=q_loss, int8_line=zl.tolist(), int8_alphas=ls.tolist())
        parts.append(img("landscape_int8_line.png", "loss from the fp32 model to its int8 version"))
    html = "\n".join([
        "<p>Notebook 2 perturbs GPT-2 along two per-tensor-scaled random directions and restores the weights by "
        "subtraction. Here directions are Gaussian and filter-normalised (Li et al. 2018), biases and norms are "
        "not moved, every point is set from a kept copy (the centre is the unperturbed loss exactly, the "
        "weights are bit-identical afterwards), and each point is one batched forward of the eval windows.</p>",
        html_table(rows),
        f"<p class=\"muted\">Loss: mean cross-entropy over {ids.shape[0]} window(s) of {ids.shape[1]} tokens of "
        "the eval split. The int8 line passes through the fp32 model (α = 0) and its absmax row-wise int8 "
        "version, de-quantized (α = 1): quantization moves the model a short way along a nearly flat valley. "
        "Run <code>llmcourse landscape --help</code> for grids, lines and planes through three models.</p>",
        *parts,
    ])
    return TourSection("Loss landscapes: planes and lines through weight space", html, summary)
