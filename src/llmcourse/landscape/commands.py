"""``llmcourse landscape``: the loss on a line or a plane through a model, along random directions
(Li et al. 2018) or towards other models (``--model-b``, ``--model-c``), written to ``--out``."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcourse.core.cli_common import (
    Result,
    add_common_args,
    add_data_args,
    add_model_args,
    model_kwargs,
    positive_int,
)
from llmcourse.core.data import load_text, tokenize_stream
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input, write_json
from llmcourse.core.lab import add_parser
from llmcourse.core.models import LoadedModel, load_model
from llmcourse.landscape import LAB
from llmcourse.landscape.directions import IGNORES, NORMS, direction_to, random_direction
from llmcourse.landscape.plots import contour_png, line_html, line_png, surface_html, surface_png
from llmcourse.landscape.surface import batched_loss, flatness, loss_on, sweep_grid, sweep_line


def eval_windows(tokenizer: Any, text: str | None, data: str = "default", split: str = "eval",
                 field: str | None = None, n_windows: int = 4, window: int = 128) -> torch.Tensor:
    """The token windows (B, T) every point is scored on: ``text`` as one window, else the first
    ``n_windows`` consecutive windows of ``window`` tokens of the data's token stream."""
    if text is not None:
        ids = tokenize_stream(tokenizer, text)
        if ids.shape[1] < 2:
            raise UserError(f"--text {text!r} is {ids.shape[1]} token(s); a loss needs at least 2",
                            "pass a longer text")
        return ids
    ids = tokenize_stream(tokenizer, load_text(data, split, field))[0]
    n = min(n_windows, ids.numel() // window)
    if n < 1:
        raise UserError(f"the data has {ids.numel()} tokens, fewer than one window of {window}",
                        "pass more text or a smaller --window")
    return ids[: n * window].reshape(n, window)


def plain_model(lm: LoadedModel) -> Any:
    """The model as plain floating-point parameters (a quantized folder is de-quantized through the
    ``info["dequantize"]`` its lab's loader provides)."""
    deq = lm.info.get("dequantize")
    return deq() if callable(deq) else lm.model


def _axis(rng: list[float] | None, default: tuple[float, float], n: int, flag: str) -> np.ndarray:
    lo, hi = rng if rng is not None else default
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise UserError(f"{flag} {lo:g} {hi:g} is an empty range", f"pass {flag} LOW HIGH with LOW < HIGH")
    xs = np.linspace(lo, hi, n)
    if n % 2 == 0 and lo < 0 < hi:  # keep the centre on the grid
        xs = np.sort(np.append(xs, 0.0))
    return xs


def _csv(xs: np.ndarray, ys: np.ndarray | None, z: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    if ys is None:
        w.writerow(["alpha", "loss"])
        w.writerows([[float(x), float(v)] for x, v in zip(xs, z, strict=True)])
    else:
        w.writerow(["alpha", "beta", "loss"])
        for i, y in enumerate(ys):
            w.writerows([[float(x), float(y), float(z[i, j])] for j, x in enumerate(xs)])
    return buf.getvalue()


def state_path(out: Path) -> Path:
    """Where a sweep keeps its partial results until ``--out`` is written (beside it)."""
    out = Path(out).expanduser().absolute()
    return out.with_name(f".{out.name}.landscape-partial.npz")


def cmd_landscape(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    check_not_input(out, [m for m in (args.model, args.model_b, args.model_c) if m and m != "default"])
    if args.model_c and not args.model_b:
        raise UserError("--model-c needs --model-b", "pass --model-b too (the plane through three models)")
    if args.model_c and args.line:
        raise UserError("--line draws one direction; --model-c asks for a plane", "drop --line or --model-c")
    towards = args.model_b is not None
    default_range = (-0.25, 1.25) if towards else (-1.0, 1.0)
    xs = _axis(args.range, default_range, args.grid, "--range")
    line = args.line
    ys = None if line else _axis(args.range_y or args.range, default_range if args.model_c else
                                 ((-1.0, 1.0) if towards and args.range is None else default_range),
                                 args.grid, "--range-y")
    t0 = time.perf_counter()
    lm = load_model(args.model, **model_kwargs(args))
    model = plain_model(lm)
    ids = eval_windows(lm.tokenizer, args.text, args.data, args.split, args.field, args.windows, args.window)
    base = batched_loss(model, ids)
    others: dict[str, float] = {}
    if towards:
        mb = plain_model(load_model(args.model_b, **model_kwargs(args)))
        d1 = direction_to(model, mb)
        others["B"] = batched_loss(mb, ids)
        del mb
        if args.model_c:
            mc = plain_model(load_model(args.model_c, **model_kwargs(args)))
            d2 = direction_to(model, mc)
            others["C"] = batched_loss(mc, ids)
            del mc
        elif not line:
            d2 = random_direction(model, args.seed, args.norm, args.ignore)
    else:
        d1 = random_direction(model, args.seed, args.norm, args.ignore)
        if not line:
            d2 = random_direction(model, args.seed + 1, args.norm, args.ignore)
    settings = {
        "model": args.model, "model_b": args.model_b, "model_c": args.model_c, "line": line,
        "grid": args.grid, "xs": xs.tolist(), "ys": None if ys is None else ys.tolist(), "norm": args.norm,
        "ignore": args.ignore, "seed": args.seed, "text": args.text,
        "data": None if args.text else args.data, "split": args.split, "windows": list(ids.shape),
        "dtype": args.dtype,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    state = state_path(out)
    if line:
        z, secs = sweep_line(model, loss_on(ids), d1, xs, state=state, key=key)
    else:
        z, secs = sweep_grid(model, loss_on(ids), d1, d2, xs, ys, state=state, key=key)
    flat = None if towards else flatness(xs, ys, z, base, args.radius)
    centre = float(z[list(xs).index(0.0)] if line else z[list(ys).index(0.0), list(xs).index(0.0)]) \
        if 0.0 in xs and (ys is None or 0.0 in ys) else None
    data = {
        **settings, "out": str(out), "base_loss": base, "centre_loss": centre, "other_losses": others,
        "min_loss": float(np.min(z)), "max_loss": float(np.max(z)),
        "flatness": {"radius": args.radius, "mean_rise": flat},
        "seconds_per_point": float(np.mean(secs[secs > 0])) if np.any(secs > 0) else None,
        "points": int(z.size), "losses": z.tolist(), "seconds": time.perf_counter() - t0,
    }
    marks_line = {"A": 0.0, "B": 1.0} if towards else {"θ0": 0.0}
    marks_plane = {"A": (0.0, 0.0), "B": (1.0, 0.0), **({"C": (0.0, 1.0)} if args.model_c else {})} \
        if towards else None
    labels = ("α (towards B)" if towards else "α (d1)", "β (towards C)" if args.model_c else "β (d2)")
    with atomic_dir(out) as tmp:
        np.savez(tmp / "surface.npz", xs=xs, ys=np.array([]) if ys is None else ys, losses=z, seconds=secs,
                 base_loss=base)
        (tmp / "surface.csv").write_text(_csv(xs, ys, z))
        files = ["surface.npz", "surface.csv", "landscape.json"]
        title = f"{args.model}: loss, {args.norm} norm" if not towards else f"{args.model} -> {args.model_b}"
        if line:
            line_png(xs, z, tmp / "line.png", title, labels[0], marks_line)
            files.append("line.png")
            if line_html(xs, z, tmp / "line.html", title, labels[0], marks_line):
                files.append("line.html")
        else:
            contour_png(xs, ys, z, tmp / "contour.png", title, labels, marks_plane)
            surface_png(xs, ys, z, tmp / "surface.png", title)
            files += ["contour.png", "surface.png"]
            if surface_html(xs, ys, z, tmp / "surface.html", title, labels, marks_plane):
                files.append("surface.html")
        data["files"] = sorted(files)
        write_json(tmp / "landscape.json", data)
    state.unlink(missing_ok=True)
    shape = f"{len(xs)} points" if line else f"{len(ys)}x{len(xs)} grid"
    text = (f"wrote {out}: {shape}, base loss {base:.4f}, min {data['min_loss']:.4f}, max {data['max_loss']:.4f}"
            + "".join(f", loss({k}) {v:.4f}" for k, v in others.items())
            + (f"; mean rise at radius {args.radius:g}: {flat:+.4f}" if flat is not None else "")
            + (f"; {data['seconds_per_point']:.3f} s per point" if data["seconds_per_point"] else "")
            + f"; {data['seconds']:.1f} s.\nfiles: {', '.join(data['files'])}")
    return Result(data, text)


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _grid(s: str) -> int:
    v = positive_int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {v}")
    return v


EXAMPLES = ("examples:\n  llmcourse landscape --grid 11 --out out/landscape\n"
            "  llmcourse landscape --line --grid 41 --range -2 2 --norm layer --out out/line\n"
            "  llmcourse landscape --text 'I have a dream' --norm layer --ignore none --out out/notebook\n"
            "  llmcourse landscape --model-b out/int8 --line --grid 21 --out out/fp32-to-int8\n"
            "  llmcourse landscape --model-b base/ --model-c tuned/ --grid 15 --out out/plane")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = add_parser(
        sub, groups, LAB, "landscape", epilog=EXAMPLES,
        description="Evaluate the loss L(a, b) = L(θ0 + a·d1 + b·d2) on a grid (or L(θ0 + a·d1) on a line with "
        "--line) and write --out: surface.npz, surface.csv, landscape.json (settings, base_loss, the grid, seconds "
        "per point), contour.png + surface.png (or line.png), and, when plotly is installed, surface.html (an "
        "interactive 3-D surface beside its contour map) or line.html, which work offline. "
        "Random directions are Gaussian (seeded), normalised per filter (Li et al. 2018), per layer or not; "
        "--model-b makes d1 = θ_B − θ_A (a = 0 is A, a = 1 is B), --model-c makes d2 = θ_C − θ_A. Each point is set "
        "from a kept copy of the weights (no drift); an interrupted run resumes when rerun with the same options.")
    add_model_args(p)
    add_model_args(p, "--model-b", default=None, help_prefix="second model of the same architecture: d1 points "
                   "to it (an int8 folder is de-quantized)")
    add_model_args(p, "--model-c", default=None, help_prefix="third model (with --model-b): d2 points to it")
    p.add_argument("--out", required=True, help="output folder (written atomically; must not be an input)")
    p.add_argument("--grid", type=_grid, default=21, help="points per axis (>= 2; 0 is added when even). "
                   "Default: %(default)s")
    p.add_argument("--range", type=_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="range of a (and b) (default: -1 1; -0.25 1.25 towards other models)")
    p.add_argument("--range-y", type=_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="range of b (default: as --range; -1 1 for the random d2 beside --model-b)")
    p.add_argument("--line", action="store_true", help="a 1-D line along d1 instead of a plane")
    p.add_argument("--norm", default="filter", choices=NORMS,
                   help="normalisation of random directions: filter (Li et al.), layer (the notebook's) or none. "
                   "Default: %(default)s")
    p.add_argument("--ignore", default="biasbn", choices=IGNORES,
                   help="biasbn: zero direction for 1-D parameters (biases, norm weights). Default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of d1 (d2 uses seed + 1). Default: %(default)s")
    p.add_argument("--text", default=None, help="score this text instead of --data windows (the notebook: "
                   "'I have a dream')")
    add_data_args(p)
    p.add_argument("--windows", type=positive_int, default=4, help="eval windows (batched). Default: %(default)s")
    p.add_argument("--window", type=_grid, default=128, help="tokens per window. Default: %(default)s")
    p.add_argument("--radius", type=_float, default=0.5,
                   help="flatness summary: mean loss rise at this distance from the centre. Default: %(default)s")
    add_common_args(p)
    p.set_defaults(func=cmd_landscape)
