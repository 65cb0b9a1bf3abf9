"""Two CPU processes (torchrun, DDP over gloo) follow the single-process loss curve with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ft_helpers import base_dir, tok  # noqa: F401  (fixtures)


@pytest.mark.slow  # two extra Python processes: about 40 s on 2 cores
def test_two_gloo_processes_match_one(tmp_path, base_dir):  # noqa: F811
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i}", "response": " ".join(str(j) for j in range(i + 3))})
                            + "\n" for i in range(8)))
    common = ["finetune", "--model", str(base_dir), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
              "--lora-dropout", "0", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, extra in (("one", []), ("two", ["--processes", "2"])):
        subprocess.run([sys.executable, "-m", "llmcourse", *common, *extra, "--out", str(tmp_path / out)],
                       check=True, env=env, capture_output=True)
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert (tmp_path / "two" / "merged" / "model.safetensors").exists()
