"""Generated bad inputs (never stored): data files, generation parameters and output targets.

Each case must end in a correct result or the one-line UserError; a traceback, a hang or an output
left behind fails. Fixed seeds; the cases are generated here, in-process (fast), plus a small CLI sample.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tiny_model
from fuzz_guard import MAX_SPIKE, Hang, MemorySpike, guarded

from llmcourse.core.data import load_texts
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, atomic_file, check_not_input, overwriting


def _bounded(fn, seconds: int = 30):
    with guarded(seconds):
        return fn()


def _outcome(fn) -> str:
    try:
        _bounded(fn)
        return "ok"
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and ":" in msg and len(msg) < 500, msg
        return "error"


def test_the_guard_sees_a_memory_spike() -> None:
    """The fuzz guard itself: 300 MB touched inside a 256 MB limit is caught; a small case passes."""
    with guarded(max_bytes=256 << 20):
        _ = b"x" * (1 << 20)
    with pytest.raises(MemorySpike):
        with guarded(max_bytes=256 << 20):
            _ = b"x" * (300 << 20)
            del _


def _data_cases(rng: random.Random, d: Path):
    """(name, path, field) of generated data files."""
    yield "missing", d / "nothere.txt", None
    yield "folder", d, None
    yield "dev-zero", Path("/dev/zero"), None
    os.mkfifo(d / "fifo.txt")
    yield "fifo", d / "fifo.txt", None
    (d / "link.jsonl").symlink_to(d / "gone.jsonl")
    yield "dangling-link", d / "link.jsonl", None
    big = d / "long.jsonl"
    big.write_text(json.dumps({"text": "x" * 5_000_000}) + "\n")
    yield "5M-char-line", big, None
    nested = d / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    yield "deep-nesting", nested, None
    for i in range(220):
        kind = rng.choice(["bytes", "utf8-bad", "json-garbage", "json-types", "csv", "txt", "ext"])
        if kind == "bytes":
            p = d / f"c{i}.{rng.choice(['txt', 'jsonl', 'csv', 'parquet'])}"
            p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400))))
        elif kind == "utf8-bad":
            p = d / f"c{i}.{rng.choice(['txt', 'jsonl', 'csv'])}"
            p.write_bytes(b'{"text": "ok"}\n' * rng.randrange(3) + b'{"text": "\xff\xfe bad"}\n')
        elif kind == "json-garbage":
            p = d / f"c{i}.jsonl"
            lines = [json.dumps({"text": "fine"}), rng.choice(["{", "}", "[1,2", '{"text": }', "null", "42",
                                                                '"s"', '{"text": "a"} trailing'])]
            p.write_text("\n".join(rng.sample(lines, len(lines))) + "\n")
        elif kind == "json-types":
            p = d / f"c{i}.jsonl"
            v = rng.choice([None, 1, 1.5, [], {}, True, "", "  ", "real text"])
            p.write_text(json.dumps({rng.choice(["text", "body"]): v}) + "\n")
        elif kind == "csv":
            p = d / f"c{i}.csv"
            p.write_text(rng.choice(["", "text\n", "a,b\n1,2\n", 'text\n"unclosed\n', "text\nhello\n", "\x00\x00"]))
        elif kind == "txt":
            p = d / f"c{i}.txt"
            p.write_text(rng.choice(["", "\n\n\n", "   ", "hello world", "\x00" * 10, "a\n\nb"]))
        else:
            p = d / f"c{i}{rng.choice(['', '.bin', '.json', '.TXT', '.gz'])}"
            p.write_bytes(b"hello")
        yield kind, p, rng.choice([None, None, "text", "body"])


def test_fuzz_data_files(tmp_path: Path) -> None:
    rng = random.Random(7)
    counts = {"ok": 0, "error": 0}
    n = 0
    for name, path, field in _data_cases(rng, tmp_path):
        try:
            counts[_outcome(lambda p=path, f=field: load_texts(str(p), "eval", f))] += 1
        except (Hang, MemorySpike) as e:
            pytest.fail(f"data case {name} ({path}): {type(e).__name__} {e}")
        n += 1
    assert n >= 220 and counts["error"] >= n // 2, counts


def _config_cases(rng: random.Random):
    extremes = [0, -1, 1, 2**31, 2**63, 10**12, 1e-45, 1e308, -1e308, float("nan"), float("inf"), -0.0, 0.5, 64, 65]
    fields = ["max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta",
              "repetition_penalty", "frequency_penalty", "presence_penalty", "penalty_last_n", "length_penalty",
              "num_return_sequences", "no_repeat_ngram_size", "seed"]
    for _ in range(320):
        kw = {rng.choice(fields): rng.choice(extremes) for _ in range(rng.randint(1, 3))}
        for k in ("max_new_tokens", "num_beams", "top_k", "penalty_last_n", "num_return_sequences",
                  "no_repeat_ngram_size", "seed"):
            if k in kw and isinstance(kw[k], float) and math.isfinite(kw[k]) and rng.random() < 0.5:
                kw[k] = int(kw[k]) if abs(kw[k]) < 2**63 else kw[k]
        kw["strategy"] = rng.choice(["greedy", "beam", "sample"])
        if kw["strategy"] == "greedy":
            kw.pop("num_return_sequences", None)
        yield kw


def test_fuzz_generation_parameters() -> None:
    """Every extreme is refused by the config or by the model check, or generates finite scores."""
    from llmcourse.decoding import GenerationConfig, generate

    model = tiny_model("llama", seed=3)
    rng = random.Random(11)
    counts = {"ok": 0, "error": 0}
    for kw in _config_cases(rng):
        def run(kw=kw):
            cfg = GenerationConfig(**{**kw, "max_new_tokens": min(kw.get("max_new_tokens", 4), 4)
                                      if isinstance(kw.get("max_new_tokens", 4), int) and 1 <= kw.get("max_new_tokens", 4) <= 4
                                      else kw.get("max_new_tokens", 4)})
            out = generate(model, None, [5, 6, 7], cfg)
            assert all(math.isfinite(s.score) or s.score == float("-inf") for s in out.sequences), kw
        try:
            counts[_outcome(run)] += 1
        except (Hang, MemorySpike) as e:
            pytest.fail(f"parameters {kw}: {type(e).__name__} {e}")
    assert sum(counts.values()) >= 300 and counts["error"] >= 50, counts


def test_fuzz_output_targets(tmp_path: Path) -> None:
    """--out values people and attackers pass: refused in one line, or written whole; nothing half-written."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    (tmp_path / "afile").write_text("keep")
    targets = [Path("."), Path("/"), Path("/proc/self/out"), Path("/sys/out"), tmp_path / ("n" * 300),
               ro / "out", tmp_path / "afile" / "inside", tmp_path / "afile", tmp_path / "new" / "deep" / "out"]
    os.chmod(ro, 0o500)
    counts = {"ok": 0, "error": 0}
    try:
        for out in targets:
            for writer in ("dir", "file"):
                def run(out=out, writer=writer):
                    check_not_input(out, [])
                    with overwriting(False):
                        if writer == "dir":
                            with atomic_dir(out) as tmp:
                                (tmp / "x").write_text("x")
                        else:
                            with atomic_file(out, "w") as f:
                                f.write("x")
                counts[_outcome(run)] += 1
    finally:
        os.chmod(ro, 0o700)
    assert (tmp_path / "afile").read_text() == "keep"
    leftovers = [p.name for p in tmp_path.rglob(".*part")]
    assert not leftovers, leftovers
    assert counts["error"] >= 8, counts


@pytest.mark.parametrize("args", [
    ["eval", "perplexity", "--data", "/dev/zero"],
    ["generate", "--prompt", "hi", "--max-new-tokens", "1000000000000"],
    ["generate", "--prompt", "hi", "--num-beams", "10000", "--strategy", "beam"],
    ["generate", "--prompt", "hi", "--early-stopping", "maybe"],
    ["generate", "--prompt", "hi", "--temperature", "1e-45", "--strategy", "sample"],
    ["convert", "hf", "--out", "."],
    ["convert", "hf", "--out", "/proc/llmcourse-out"],
])
def test_cli_sample_one_line_exit_2(args: list[str]) -> None:
    exe = str(Path(sys.executable).with_name("llmcourse"))
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + 30
        while True:  # wait4 ourselves: it gives the child's peak resident memory
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pytest.fail(f"{args} hung")
            time.sleep(0.05)
        err.seek(0)
        stderr = err.read()
    assert os.waitstatus_to_exitcode(status) == 2, (args, stderr[-500:])
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert usage.ru_maxrss * 1024 < MAX_SPIKE, f"{args} peaked at {usage.ru_maxrss} kB"
