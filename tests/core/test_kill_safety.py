"""A command killed at any moment leaves --out whole or absent; what it left beside it is cleaned next run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_folder

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


EXE = str(Path(sys.executable).with_name("llmcourse"))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    """A small Llama folder with the default model's tokenizer (so every command, GGUF included, accepts it)."""
    return tiny_folder(tmp_path_factory.mktemp("kill") / "src", seed=1, chat_template=True, hidden_size=128,
                       intermediate_size=512, num_hidden_layers=4)


def _temporaries(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.name.startswith(".") and f.name.endswith(".part")]


def _kill_while_writing(args: list[str], folder: Path, rng: random.Random, timeout: float = 120) -> bool:
    """Start the command, wait until its temporary output appears beside --out, then SIGKILL it a random
    0-0.4 s later. True if it was killed (False: it finished first)."""
    p = subprocess.Popen([EXE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while p.poll() is None and not _temporaries(folder):
        assert time.monotonic() < deadline, f"{args} wrote no temporary within {timeout} s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.4))
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


def _whole(out: Path, kind: str) -> bool:
    """True if ``out`` is a complete output of its kind."""
    if kind == "gguf":
        from llmcourse.core.gguf_container import read_gguf_header

        _, infos = read_gguf_header(out)
        return bool(infos) and max(t.offset + t.nbytes for t in infos) <= out.stat().st_size
    if kind == "gguf-folder":
        files = list(out.glob("*.gguf"))
        return (out / ".llmcourse-output").exists() and bool(files) and all(_whole(f, "gguf") for f in files)
    names = {f.name for f in out.iterdir()}
    need = {"index.html", "summary.json"} if kind == "tour" else {"config.json", "model.safetensors"}
    return need | {".llmcourse-output"} <= names


COMMANDS = {  # name: (argv without --out, output kind)
    "convert hf": (["convert", "hf", "--model", "{src}"], "folder"),
    "quantize int8": (["quantize", "int8", "--model", "{src}"], "folder"),
    "convert gguf": (["convert", "gguf", "--model", "{src}", "--dtype", "f32"], "gguf"),
    "quantize gguf": (["quantize", "gguf", "--model", "{gguf}", "--type", "Q4_K_M"], "gguf-folder"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_commands_killed_while_writing(tiny_src: Path, tmp_path: Path, name: str) -> None:
    """SIGKILL at two random moments of the write: --out is whole or absent; the next run cleans up."""
    argv, kind = COMMANDS[name]
    gguf = tiny_src.parent / "src.gguf"
    if "{gguf}" in argv and not gguf.exists():
        r = subprocess.run([EXE, "convert", "gguf", "--model", str(tiny_src), "--dtype", "f32", "--out", str(gguf)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    argv = [a.format(src=tiny_src, gguf=gguf) for a in argv]
    out = tmp_path / ("out.gguf" if kind == "gguf" else "out")
    rng = random.Random(name)
    killed = 0
    for _ in range(2):
        killed += _kill_while_writing([*argv, "--out", str(out), "--overwrite"], tmp_path, rng)
        assert not out.exists() or _whole(out, kind), f"{name}: a partial {out.name} was left"
    assert killed, f"{name} finished before any kill: the test did not test"
    r = subprocess.run([EXE, *argv, "--out", str(out), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _whole(out, kind) and _temporaries(tmp_path) == [], "the next run left temporaries behind"


def test_tour_killed_while_writing(tiny_src: Path, tmp_path: Path) -> None:
    """The tour writes its page in one atomic folder: killed while writing, it leaves nothing at --out, and
    what it left beside it is named as a dead run's temporary (removed by the next run, as tested above)."""
    out = tmp_path / "tour"
    killed = _kill_while_writing(["tour", "--quick", "--model", str(tiny_src), "--out", str(out)], tmp_path,
                                 random.Random(5), timeout=300)
    assert not out.exists() or _whole(out, "tour")
    for t in _temporaries(tmp_path):
        assert t.name.startswith(".tour.") and not Path(f"/proc/{t.name.split('.')[2]}").exists()
    assert killed or _whole(out, "tour")


def _interrupt(p: subprocess.Popen, out: Path, tmp_path: Path) -> None:
    """Ctrl-C to ``p``: one line, exit 130, nothing at ``out`` nor temporaries beside it (skips when ``p`` had
    already finished)."""
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the command finished before Ctrl-C reached it")
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "llmcourse: interrupted" and "Traceback" not in err, err
    assert not out.exists() and _temporaries(tmp_path) == []


def test_ctrl_c_while_writing_prints_one_line_exits_130_and_cleans_up(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = subprocess.Popen([EXE, "convert", "hf", "--model", str(tiny_src), "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and not _temporaries(tmp_path):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    _interrupt(p, out, tmp_path)


# --- issue 31: Ctrl-C early in start-up, a closed stdout, dead runs' temporaries cleaned by any command ----------

@pytest.fixture(scope="module")
def tiny_small(tmp_path_factory) -> Path:
    """A 64-wide Llama with the default model's tokenizer (the start-up cases need a model, not a big one)."""
    return tiny_folder(tmp_path_factory.mktemp("sigint") / "src", seed=1, chat_template=True)


EARLY = {
    "convert hf": ["convert", "hf", "--model", "{src}", "--out", "{out}"],
    "quantize int8": ["quantize", "int8", "--model", "{src}", "--out", "{out}"],
    "generate": ["generate", "--model", "{src}", "--prompt", "hi", "--max-new-tokens", "200"],
    "eval perplexity": ["eval", "perplexity", "--model", "{src}", "--max-length", "64", "--stride", "32"],
    "chat": ["chat", "--model", "{src}", "--prompt", "hi", "--max-new-tokens", "200"],
}


@pytest.mark.parametrize("name", list(EARLY))
def test_ctrl_c_during_start_up(tiny_small: Path, tmp_path: Path, name: str) -> None:
    """SIGINT 0.5-2 s after the start (imports, model load): one line, exit 130, nothing at or beside --out."""
    out = tmp_path / "out"
    argv = [a.format(src=tiny_small, out=out) for a in EARLY[name]]
    p = subprocess.Popen([EXE, *argv, "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(random.Random(name).uniform(0.5, 2.0))
    _interrupt(p, out, tmp_path)


def test_closed_stdout_exits_quietly(tiny_small: Path) -> None:
    """``llmcourse generate ... | head -c 1``: no BrokenPipeError traceback, the SIGPIPE status (141), nothing on stderr."""
    p = subprocess.Popen([EXE, "generate", "--model", str(tiny_small), "--prompt", "hi", "--max-new-tokens", "40",
                          "--backend", "hf", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode in (0, 141) and "Traceback" not in err and "Error" not in err, (p.returncode, err)


def test_a_failing_command_still_cleans_dead_runs_temporaries(tmp_path: Path) -> None:
    """The temporaries a killed run left beside --out go at the next command's output check, even when that
    command then fails (a bad --model) and never writes."""
    from llmcourse.cli import main

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    stale = [tmp_path / f".out.{dead.pid}.abc.part", tmp_path / f".llmcourse-probe.{dead.pid}.x.part"]
    stale[0].mkdir()
    (stale[0] / "half.safetensors").write_bytes(b"x")
    stale[1].write_bytes(b"x")
    assert main(["convert", "hf", "--model", str(tmp_path / "nothere"), "--out", str(out)]) == 2
    assert not any(s.exists() for s in stale)
