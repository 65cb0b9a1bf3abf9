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


# --- issue 31: paths, environment, parameters and chat templates as commands (in-process: no start-up cost) ---

@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder (256-token BPE tokenizer), its F32 GGUF, a copy with a NaN weight, a copy whose own
    chat template is hostile, and a loop-bomb template file."""
    from safetensors.torch import load_file, save_file
    from tiny_gguf import write_tiny_llama_gguf

    from llmcourse.core.models import load_model

    d = tmp_path_factory.mktemp("cli31")
    model = tiny_model("llama", vocab_size=256)
    write_tiny_llama_gguf(model, d / "tiny.gguf")
    hf = d / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    tok = load_model(str(d / "tiny.gguf")).tokenizer
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    tok.save_pretrained(hf)
    nan = d / "nan"
    nan.mkdir()
    for f in hf.iterdir():
        (nan / f.name).symlink_to(f)
    (nan / "model.safetensors").unlink()
    state = load_file(str(hf / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    hostile = d / "hostile"
    hostile.mkdir()
    for f in hf.iterdir():
        if f.name != "chat_template.jinja":
            (hostile / f.name).symlink_to(f)
    (hostile / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    (d / "bomb.jinja").write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    return {"hf": hf, "gguf": d / "tiny.gguf", "nan": nan, "hostile": hostile, "bomb": d / "bomb.jinja", "dir": d}


CLI31 = {  # label: (argv with {hf} {gguf} {nan} {hostile} {bomb} {out}, what the one line must say)
    "~nonexistent_user": (["generate", "--model", "~nonexistent_user/x", "--prompt", "hi"], "no such user"),
    "/proc/self/mem": (["generate", "--model", "/proc/self/mem", "--prompt", "hi"], "/proc/self/mem"),
    "5,000-character path": (["generate", "--model", "/tmp/" + "/".join(["a" * 200] * 25), "--prompt", "hi"],
                             "too long"),
    "--out ''": (["convert", "hf", "--model", "{hf}", "--out", ""], "--out is empty"),
    "--group-size 1e9": (["quantize", "int8", "--model", "{hf}", "--granularity", "group", "--group-size",
                          "1000000000", "--out", "{out}"], "--group-size"),
    "imatrix --chunk-size over the context": (["imatrix", "--model", "{hf}", "--chunk-size", "5000", "--out",
                                               "{out}"], "context"),
    "--imatrix given a model GGUF": (["quantize", "gguf", "--model", "{gguf}", "--type", "Q4_K_M", "--imatrix",
                                      "{gguf}", "--out", "{out}"], "token_embd.weight"),
    "NaN weight (eval)": (["eval", "perplexity", "--model", "{nan}", "--max-length", "64", "--max-tokens", "128"],
                          "model.layers.1.mlp.up_proj.weight"),
    "NaN weight (quantize int8)": (["quantize", "int8", "--model", "{nan}", "--out", "{out}"],
                                   "model.layers.1.mlp.up_proj.weight"),
    "hostile template (chat)": (["chat", "--model", "{hostile}", "--prompt", "hi", "--max-new-tokens", "2"],
                                "chat_template.jinja"),
    "loop-bomb --chat-template (models)": (["models", "--model", "{hf}", "--chat-sample", "hi", "--chat-template",
                                            "{bomb}"], "bomb.jinja"),
}


@pytest.mark.parametrize("label", list(CLI31))
def test_issue31_cases_one_line_exit_2(tiny_cli, tmp_path, label, capsys) -> None:
    from llmcourse.cli import main

    argv, expect = CLI31[label]
    out = tmp_path / "out"
    argv = [a.format(out=out, **tiny_cli) for a in argv]
    t0 = time.monotonic()
    with guarded(30):
        code = main([*argv, "--threads", "1"])
    secs = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    assert expect in err, err
    assert secs < 10, f"{label}: {secs:.1f} s"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_issue31_valid_requests_give_results(tiny_cli, capsys) -> None:
    """A last window of one token (--max-length 2 --stride 2 on 101 tokens) and --chat-template none."""
    from llmcourse.cli import main

    assert main(["eval", "perplexity", "--model", str(tiny_cli["hf"]), "--max-length", "2", "--stride", "2",
                 "--max-tokens", "101", "--json", "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 51 and math.isfinite(r["perplexity"])  # 50 windows + the last token's (was an IndexError)
    assert main(["models", "--model", str(tiny_cli["hf"]), "--chat-sample", "hi", "--chat-template", "none",
                 "--threads", "1"]) == 0
    assert main(["chat", "--model", str(tiny_cli["hostile"]), "--prompt", "hi", "--max-new-tokens", "2",
                 "--chat-template", "none", "--threads", "1"]) == 0


def test_eval_refuses_a_nan_result() -> None:
    """A model whose outputs are NaN (weights changed after loading) never prints ``perplexity nan``."""
    import torch

    from llmcourse.core.evaluate import compare, perplexity

    model = tiny_model("llama", seed=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    ids = torch.arange(1, 60).reshape(1, -1)
    with pytest.raises(UserError, match="perplexity is nan"):
        perplexity(model, ids, max_length=32, stride=16)
    with pytest.raises(UserError, match="KL divergence is nan"):
        compare(model, tiny_model("llama", seed=2), ids, max_length=32)


def test_tree_plot_memory_is_bounded(tmp_path: Path) -> None:
    """The tree of a 200-step sampled generation (``generate --strategy sample --tree t.png --max-new-tokens 200``)
    was a 700-megapixel figure (4.6 GB peak); its raster is now capped at 40 Mpx."""
    from llmcourse.decoding import tree
    from llmcourse.decoding.engine import StepRecord

    probs = [0.5 / (i + 1) for i in range(30)]
    records = [StepRecord(list(range(30)), probs, probs, 30, 3, 0.1) for _ in range(200)]
    t = tree.tree_from_records(None, "prompt", records)
    with guarded(60, max_bytes=1 << 30):
        tree.draw_tree(t, tmp_path / "t.png", title="sample")
    assert (tmp_path / "t.png").stat().st_size > 0
