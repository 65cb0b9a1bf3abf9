"""Helpers shared by the benchmark scripts: timing, medians, machine description, result files."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rows_for(w, block: int):
    """``w`` as rows whose length is a multiple of ``block`` (ggml quantizes whole blocks), or None if it cannot be."""
    import numpy as np

    w = w.reshape(-1, w.shape[-1])
    if w.shape[-1] % block == 0:
        return w
    n = int(np.lcm(w.shape[-1], block))
    return w.reshape(-1, n) if w.size % n == 0 else None


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores {cpu}, {mem:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads"


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_result(name: str, title: str, table: str, notes: str = "") -> Path:
    """Write ``bench/results/NAME.md`` (a section of BENCHMARKS.md) and print it."""
    RESULTS.mkdir(exist_ok=True)
    text = f"## {title}\n\n_{date.today().isoformat()}, {machine()}_\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


def md_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def trl_timed(make_trainer: Callable[[list], object]) -> tuple[list[int], list[float], list[float]]:
    """Train the TRL trainer that ``make_trainer(callbacks)`` builds (seed 0) and return, per optimizer step,
    (tokens, seconds, losses): tokens from TRL's cumulative ``num_tokens`` (the attention-mask sum), seconds
    from a callback around each step."""
    import torch
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.seconds = 0.0, {}

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.seconds[state.global_step] = time.perf_counter() - self.t0

    cb = StepTimes()
    torch.manual_seed(0)
    trainer = make_trainer([cb])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "num_tokens" in h]
    seen = {h["step"]: int(h["num_tokens"]) for h in logs}
    steps_done = sorted(cb.seconds)
    tokens = [seen[s] - seen.get(s - 1, 0) for s in steps_done]
    return tokens, [cb.seconds[s] for s in steps_done], [h["loss"] for h in logs]


def anchor_venv(venv: Path) -> list[str]:
    """Create the anchor's virtual environment ``venv`` (git-ignored beside the others) with the CPU build of
    torch 2.13.0 installed first, and return its ``pip install --quiet`` command for the anchor's own pins."""
    import subprocess
    import sys

    venv.parent.mkdir(parents=True, exist_ok=True)
    (venv.parent / ".gitignore").write_text("*\n")
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the configured index serves the CPU build here
    return pip
