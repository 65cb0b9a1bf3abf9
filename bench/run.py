"""Run every benchmark script in bench/ and assemble BENCHMARKS.md from bench/results/*.md."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["core.py", "decoding.py", "busy.py", "int8.py", "gguf_quant.py"]


def assemble() -> None:
    from common import machine

    parts = [f"# Benchmarks\n\nLatest results, {date.today().isoformat()}, on {machine()}.\n"
             "Each table compares llmcourse with its anchor measured in the same run (median of several runs); "
             "ratios matter more than absolute times on this shared machine.\n"]
    order = ["core", "decoding", "int8", "gguf"]
    files = sorted((HERE / "results").glob("*.md"),
                   key=lambda f: (order.index(f.stem) if f.stem in order else len(order), f.stem))
    titles = {"decoding": "Decoding: ours vs generate() and llama.cpp (bench/decoding.py)"}
    for f in files:
        text = f.read_text()
        parts.append(text if text.lstrip().startswith("#") else f"## {titles.get(f.stem, f.stem)}\n\n{text}")
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))


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
