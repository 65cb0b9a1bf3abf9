"""The README's quickstart runs top to bottom on a fresh folder, as a newcomer would type it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_commands_are_llmcourse_commands() -> None:
    cmds = quickstart_commands()
    assert len(cmds) >= 10 and all(c.startswith("llmcourse ") for c in cmds)


@pytest.mark.slow
def test_readme_quickstart_runs_top_to_bottom(tmp_path: Path) -> None:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    for cmd in quickstart_commands():
        r = subprocess.run(shlex.split(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"`{cmd}` failed: {r.stderr[-800:]}"
    assert (tmp_path / "out" / "tour" / "index.html").exists() and (tmp_path / "beam.png").exists()
