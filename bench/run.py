"""Run every benchmark script in bench/ and assemble BENCHMARKS.md from bench/results/*.md."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["core.py", "decoding.py", "busy.py", "int8.py", "gguf_quant.py"]


BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def assemble() -> None:
    """Put this run's tables (bench/results/*.md of the scripts run) into BENCHMARKS.md between the markers.

    BENCHMARKS.md also holds the hand-written sections of every issue's benchmarks (commands, loads, what the
    figures mean), which no script regenerates: only the block between BEGIN and END is replaced (appended at the
    end the first time), so `make bench` never loses them."""
    from common import machine

    parts = [BEGIN, f"# Latest `make bench` ({date.today().isoformat()}, {machine()})\n",
             "Each table compares llmcourse with its anchor measured in the same run (median of several runs); "
             "ratios matter more than absolute times on this shared machine.\n"]
    order = ["core", "decoding", "int8", "gguf"]
    stems = {Path(s).stem for s in SCRIPTS}
    files = sorted((f for f in (HERE / "results").glob("*.md") if f.stem in stems or f.stem == "gguf"),
                   key=lambda f: (order.index(f.stem) if f.stem in order else len(order), f.stem))
    titles = {"decoding": "Decoding: ours vs generate() and llama.cpp (bench/decoding.py)"}
    for f in files:
        text = f.read_text()
        parts.append(text if text.lstrip().startswith("#") else f"## {titles.get(f.stem, f.stem)}\n\n{text}")
    parts.append(END)
    block = "\n".join(parts)
    target = HERE.parent / "BENCHMARKS.md"
    current = target.read_text() if target.exists() else "# Benchmarks\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        current = head + block + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(current)
    tmp.replace(target)


def main() -> int:
    sys.path.insert(0, str(HERE))
    only = sys.argv[1:]
    rc = 0
    for name in SCRIPTS:
        if only and Path(name).stem not in only:
            continue
        script = HERE / name
        if script.exists():
            print(f"== {name}", flush=True)
            rc |= subprocess.call([sys.executable, str(script)])
    assemble()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
