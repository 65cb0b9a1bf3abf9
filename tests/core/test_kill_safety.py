"""A command killed at any moment leaves --out whole or absent; what it left beside it is cleaned next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model

from llmcourse.core.io import atomic_dir


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc.part"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    mine = tmp_path / f".out.{os.getpid()}.xyz.part"  # a live process's: kept
    mine.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("done")
    assert not stale.exists() and mine.exists() and (out / "a.txt").read_text() == "done"


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.5])
def test_convert_hf_killed_at_random_moments(tmp_path: Path, delay: float) -> None:
    src = tmp_path / "src"
    tiny_model("llama", seed=1, hidden_size=256, intermediate_size=1024, num_hidden_layers=4).save_pretrained(src)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(src)
    out = tmp_path / "out"
    exe = str(Path(sys.executable).with_name("llmcourse"))
    p = subprocess.Popen([exe, "convert", "hf", "--model", str(src), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if out.exists():  # whole: every file of a complete folder
        assert {"config.json", "model.safetensors", ".llmcourse-output"} <= {f.name for f in out.iterdir()}
    # the next run succeeds and leaves nothing hidden behind
    r = subprocess.run([exe, "convert", "hf", "--model", str(src), "--out", str(out), "--overwrite"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
