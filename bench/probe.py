"""Re-run issue 16's bad-input examples as commands: each must give one line, exit 2, in under 5 seconds.

    python bench/probe.py            # all examples (about 3 minutes), writes bench/results/probe.md
    python bench/probe.py --only template,nonfinite,tensor-meta,dtype,paths,parameters31   # issue 31's

Every example of issue 16's list, and of issue 31's (hostile chat templates, NaN/Inf weights, lying tensor
metadata, integer dtypes, paths, parameters), is rebuilt here (in a temporary folder, on a small Llama with the default
model's tokenizer, or on the default model where the example names it) and run through the `llmcourse` CLI
in a fresh process, so the time includes Python, torch and the model load, as a user sees it. A case passes
when the process exits 2 with one line on stderr, no traceback, in under 5 s, and leaves no --out behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

EXE = str(Path(sys.executable).with_name("llmcourse"))
LIMIT_S = 5.0
# examples whose right answer is a result, not an error: the complaint was the crash (IndexError);
# non-overlapping windows (stride = window) and 2-token windows are valid perplexity settings
EXPECT_RESULT = {"perplexity stride = window", "--max-length 2 --stride 2",
                 "--max-length 2 --stride 2 --max-tokens 101"}
if os.geteuid() == 0:  # root writes into a 0500 folder: the write succeeds, rightly
    EXPECT_RESULT.add("a read-only folder")


def small_folder(d: Path) -> Path:
    """A 4-layer Llama (hidden 128) with the default model's tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmcourse.core.models import default_model_dir

    src = d / "small"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir() / name).exists():
            shutil.copy(default_model_dir() / name, src / name)
    return src


def copy_with(src: Path, dst: Path, **files: bytes | str | None) -> Path:
    """A copy of folder ``src`` with some files replaced (bytes/str) or removed (None)."""
    shutil.copytree(src, dst)
    for name, content in files.items():
        p = dst / name.replace("__", ".")
        p.unlink(missing_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
    return dst


def st_parts(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_blob(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def gguf_with(src: Path, key: str | None = None, value=None, vtype=None, drop_tensors: bool = False) -> bytes:
    """The GGUF ``src`` rewritten with one metadata value set (or with no tensors)."""
    import io

    import numpy as np

    from llmcourse.core.gguf_container import KV, Tensor, read_gguf_header, write_gguf

    kvs, infos = read_gguf_header(src)
    data = src.read_bytes()
    tensors = [] if drop_tensors else [
        Tensor(t.name, t.shape, t.qtype, lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset)) for t in infos]
    if key is not None:
        kvs = [*[kv for kv in kvs if kv.key != key], KV(key, value, vtype)]
    buf = io.BytesIO()
    write_gguf(buf, kvs, tensors)
    return buf.getvalue()


def patch(blob: bytes, marker: bytes, fmt: str, value, skip: int = 0) -> bytes:
    i = blob.index(marker) + len(marker) + skip
    b = bytearray(blob)
    struct.pack_into(fmt, b, i, value)
    return bytes(b)


def build(d: Path) -> list[tuple[str, str, list[str], Path | None]]:
    """(class, example, argv, out) for every example of the issue."""
    from gguf import GGUFValueType as VT

    small = small_folder(d)
    f32 = d / "small.gguf"
    subprocess.run([EXE, "convert", "gguf", "--model", str(small), "--dtype", "f32", "--out", str(f32)], check=True,
                   capture_output=True)
    header, data = st_parts(small / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    config = json.loads((small / "config.json").read_text())
    cases: list[tuple[str, str, list[str], Path | None]] = []
    n = [0]

    def folder(**files) -> str:
        n[0] += 1
        return str(copy_with(small, d / f"m{n[0]}", **files))

    def gfile(blob: bytes) -> str:
        n[0] += 1
        p = d / f"g{n[0]}.gguf"
        p.write_bytes(blob)
        return str(p)

    ppl = ["eval", "perplexity", "--max-tokens", "64", "--model"]
    # safetensors headers that parse but lie
    text = json.dumps(header)
    dup = text[:-1] + ", " + json.dumps({names[0]: header[names[0]]})[1:-1] + "}"
    cases.append(("safetensors", "duplicate JSON key", ppl + [folder(model__safetensors=st_blob(dup, data))], None))
    for label, edit in [("lower-case dtype", lambda h: h[names[0]].update(dtype="f32")),
                        ("integer dtype", lambda h: h[names[0]].update(dtype=0))]:
        h = json.loads(text)
        edit(h)
        cases.append(("safetensors", label, ppl + [folder(model__safetensors=st_blob(h, data))], None))
    h = json.loads(text)
    later = next(k for k in names if h[k]["data_offsets"][0] >= 64)
    s, e = h[later]["data_offsets"]
    h[later]["data_offsets"] = [s - 8, e - 8]
    cases.append(("safetensors", "overlapping offsets", ppl + [folder(model__safetensors=st_blob(h, data))], None))
    h = json.loads(text)
    for k in names:
        s, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [s + 4, e + 4]
    cases.append(("safetensors", "gap between tensors", ppl + [folder(model__safetensors=st_blob(h, b"\0" * 4 + data))],
                  None))
    cases.append(("safetensors", "trailing bytes", ppl + [folder(model__safetensors=st_blob(header, data + b"xyz"))],
                  None))
    h = json.loads(text)
    up = next(k for k in names if k.endswith("up_proj.weight"))
    h[up]["shape"] = h[up]["shape"][::-1]
    cases.append(("safetensors", "shape transposed against config.json", ppl + [folder(model__safetensors=st_blob(h, data))],
                  None))
    m = folder(model__safetensors=None)
    (Path(m) / "model.safetensors").mkdir()
    cases.append(("safetensors", "model.safetensors is a folder", ppl + [m], None))
    m = folder(model__safetensors=None)
    (Path(m) / "model.safetensors").symlink_to(d / "gone.safetensors")
    cases.append(("safetensors", "model.safetensors a dangling symlink", ppl + [m], None))
    m = folder(model__safetensors=None)
    os.mkfifo(Path(m) / "model.safetensors")
    cases.append(("safetensors", "model.safetensors a FIFO", ppl + [m], None))
    # config.json values
    for label, edit in [("num_attention_heads 0", {"num_attention_heads": 0}),
                        ("heads not dividing hidden", {"num_attention_heads": 3}),
                        ("hidden_size null", {"hidden_size": None}), ("hidden_size a string", {"hidden_size": "128"}),
                        ("vocabulary of 2^31", {"vocab_size": 2**31})]:
        cases.append(("config.json", label, ppl + [folder(config__json=json.dumps({**config, **edit}))], None))
    cases.append(("config.json", "num_hidden_layers -1 (quantize gguf)",
                  ["quantize", "gguf", "--type", "Q8_0", "--out", str(d / "o-q"), "--model",
                   folder(config__json=json.dumps({**config, "num_hidden_layers": -1}))], d / "o-q"))
    # GGUF metadata
    blob = gguf_with(f32, "general.alignment", 32, VT.UINT32)
    key = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<I", VT.UINT32)
    for bad in (0, 3):
        cases.append(("gguf", f"general.alignment {bad}", ppl + [gfile(patch(blob, key, "<I", bad))], None))
    for label, value, vt in [("block_count a string", "2", VT.STRING), ("block_count 0", 0, VT.INT32),
                             ("block_count -1", -1, VT.INT32), ("block_count 2^31", 2**31, VT.UINT64)]:
        cases.append(("gguf", label, ppl + [gfile(gguf_with(f32, "llama.block_count", value, vt))], None))
    for label, key_, value in [("bos_token_id 10^9", "tokenizer.ggml.bos_token_id", 10**9),
                               ("context length 0", "llama.context_length", 0)]:
        vt = VT.UINT32
        cases.append(("gguf", label, ppl + [gfile(gguf_with(f32, key_, value, vt))], None))
    cases.append(("gguf", "n_tensors 0", ppl + [gfile(gguf_with(f32, drop_tensors=True))], None))
    raw = f32.read_bytes()
    emb = struct.pack("<Q", len("token_embd.weight")) + b"token_embd.weight"
    cases.append(("gguf", "a dimension of 2^63", ppl + [gfile(patch(raw, emb, "<Q", 2**63, skip=4))], None))
    cases.append(("gguf", "a dimension of 2^63 (quantize gguf)",
                  ["quantize", "gguf", "--type", "Q8_0", "--out", str(d / "o-q2"), "--model",
                   gfile(patch(raw, emb, "<Q", 2**63, skip=4))], d / "o-q2"))
    q = struct.pack("<Q", len("blk.0.attn_q.weight")) + b"blk.0.attn_q.weight"
    (n_dims,) = struct.unpack_from("<I", raw, raw.index(q) + len(q))
    cases.append(("gguf", "K-quant tensor on 128-wide rows", ppl + [gfile(patch(raw, q, "<I", 12, skip=4 + 8 * n_dims))],
                  None))
    cases.append(("gguf", "an infinite float (rms epsilon)",
                  ppl + [gfile(gguf_with(f32, "llama.attention.layer_norm_rms_epsilon", float("inf"), VT.FLOAT32))],
                  None))
    # data files
    bad = d / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    nested = d / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    fifo = d / "fifo.txt"
    os.mkfifo(fifo)
    long = d / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 10_000_000}) + "\n")
    for label, path in [("non-UTF-8 JSONL", bad), ("deeply nested JSON", nested), ("/dev/zero", Path("/dev/zero")),
                        ("a FIFO", fifo), ("one 50 MB line", long)]:
        cases.append(("data", label, ["eval", "perplexity", "--model", str(small), "--data", str(path)], None))
    # parameters
    gen = ["generate", "--model", str(small), "--prompt", "hi"]
    for label, extra in [("--max-new-tokens 1e12", ["--max-new-tokens", "1e12"]),
                         ("--max-new-tokens 2^63", ["--max-new-tokens", str(2**63)]),
                         ("--num-beams 10000", ["--strategy", "beam", "--num-beams", "10000"]),
                         ("--temperature 1e-45 (hf backend)", ["--strategy", "sample", "--temperature", "1e-45",
                                                               "--backend", "hf"]),
                         ("--frequency-penalty 1e308", ["--frequency-penalty", "1e308"]),
                         ("--length-penalty 1e308", ["--strategy", "beam", "--length-penalty", "1e308"]),
                         ("--early-stopping maybe", ["--early-stopping", "maybe"])]:
        cases.append(("parameters", label, gen + extra, None))
    cases.append(("parameters", "a 100,000-character prompt",
                  ["generate", "--model", str(small), "--prompt", "x " * 50_000], None))
    cases.append(("parameters", "a prompt with a lone surrogate",
                  ["generate", "--model", str(small), "--prompt", "hi \udc80"], None))
    cases.append(("parameters", "perplexity stride = window",
                  ["eval", "perplexity", "--model", str(small), "--max-length", "64", "--stride", "64",
                   "--max-tokens", "256"], None))
    cases.append(("parameters", "--max-length 2 --stride 2",
                  ["eval", "perplexity", "--model", str(small), "--max-length", "2", "--stride", "2",
                   "--max-tokens", "256"], None))
    cases.append(("parameters", "quantize int8 --group-size 1e9",
                  ["quantize", "int8", "--model", str(small), "--group-size", "1e9", "--out", str(d / "o-i8")],
                  d / "o-i8"))
    cases.append(("parameters", "imatrix with 10^9 chunks",
                  ["imatrix", "--model", str(small), "--chunks", str(10**9), "--out", str(d / "o-im.gguf")],
                  d / "o-im.gguf"))
    # output targets
    ro = d / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    afolder = d / "afolder"
    afolder.mkdir()
    conv = ["convert", "hf", "--model", str(small), "--out"]
    for label, out in [("--out .", "."), ("a read-only folder", str(ro / "out")), ("/proc", "/proc/llmcourse"),
                       ("/sys", "/sys/llmcourse"), ("a 300-character name", str(d / ("n" * 300))),
                       ("/dev/full (no space left)", "/dev/full")]:
        cases.append(("out", label, conv + [out], None))
    cases.append(("out", "an existing folder where a file is due",
                  ["convert", "gguf", "--model", str(small), "--out", str(afolder)], None))
    return cases + build31(d, small, f32, folder, gfile)


def _tensor_field(blob: bytes, name: str, field: str, value: int) -> bytes:
    """``blob`` with the type (u32) of tensor ``name`` set, or its offset (u64) moved by ``value``."""
    enc = struct.pack("<Q", len(name)) + name.encode()
    i = blob.index(enc) + len(enc)
    (n_dims,) = struct.unpack_from("<I", blob, i)
    at = i + 4 + 8 * n_dims
    if field == "type":
        return patch(blob, enc, "<I", value, skip=4 + 8 * n_dims)
    (old,) = struct.unpack_from("<Q", blob, at + 4)
    return patch(blob, enc, "<Q", old + value, skip=4 + 8 * n_dims + 4)


def build31(d: Path, small: Path, f32: Path, folder, gfile) -> list[tuple[str, str, list[str], Path | None]]:
    """Issue 31's examples: hostile chat templates, NaN/Inf weights, lying tensor metadata, integer dtypes,
    paths and environment, parameters."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from llmcourse.core.gguf_container import read_gguf_header

    cases: list[tuple[str, str, list[str], Path | None]] = []
    chat = ["chat", "--prompt", "hi", "--max-new-tokens", "4", "--model"]
    sample = ["models", "--chat-sample", "hi", "--model"]
    for label, tpl in [("SSTI through cycler.__init__.__globals__", "{{ cycler.__init__.__globals__.os.popen('id').read() }}"),
                       ("include", "{% include 'other.jinja' %}"), ("raise_exception", "{{ raise_exception('no') }}"),
                       ("syntax error", "{% for m in messages %}"), ("undefined attribute", "{{ messages[0].x.y }}"),
                       ("string bomb", "{{ 'x' * 10**10 }}"), ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
                       ("two nested range(100000) loops",
                        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")]:
        cases.append(("template", f"{label} (chat)", chat + [folder(chat_template__jinja=tpl)], None))
    cases.append(("template", "a 70 MB template (models --chat-sample)",
                  sample + [folder(chat_template__jinja="{# " + "x" * 70_000_000 + " #}")], None))
    bomb = d / "bomb.jinja"
    bomb.write_text("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
    cases.append(("template", "--chat-template loop bomb (models --chat-sample)",
                  sample + [str(small), "--chat-template", str(bomb)], None))
    # NaN / Inf weights
    state = load_file(str(small / "model.safetensors"))
    up = next(k for k in sorted(state) if k.endswith("up_proj.weight"))
    bad = dict(state)
    bad[up] = state[up].copy()
    bad[up][1, 2] = np.nan
    raw = d / "nan.safetensors"
    save_file(bad, str(raw), metadata={"format": "pt"})
    nan_folder = folder(model__safetensors=raw.read_bytes())
    cases.append(("nonfinite", "NaN weight (eval perplexity)", ["eval", "perplexity", "--max-tokens", "64", "--max-length", "256", "--stride", "128", "--model",
                                                                 nan_folder], None))
    cases.append(("nonfinite", "NaN weight (quantize int8)", ["quantize", "int8", "--model", nan_folder, "--out",
                                                               str(d / "o-nan-i8")], d / "o-nan-i8"))
    _, infos = read_gguf_header(f32)
    t = next(t for t in infos if t.name == "blk.1.ffn_up.weight")
    blob = bytearray(f32.read_bytes())
    struct.pack_into("<f", blob, t.offset + 40, float("inf"))
    cases.append(("nonfinite", "Inf weight in an F32 GGUF (quantize gguf)",
                  ["quantize", "gguf", "--type", "Q8_0", "--model", gfile(bytes(blob)), "--out", str(d / "o-inf")],
                  d / "o-inf"))
    # tensor metadata that lies
    raw32 = f32.read_bytes()
    for qt, code in (("Q4_0", 2), ("F16", 1), ("Q8_0", 8)):
        cases.append(("tensor-meta", f"F32 tensor relabelled {qt} (eval perplexity)",
                      ["eval", "perplexity", "--max-tokens", "64", "--max-length", "256", "--stride", "128", "--model",
                       gfile(_tensor_field(raw32, "blk.0.attn_q.weight", "type", code))], None))
    cases.append(("tensor-meta", "offset misaligned by one byte (generate)",
                  ["generate", "--prompt", "hi", "--max-new-tokens", "2", "--model",
                   gfile(_tensor_field(raw32, "blk.0.ffn_up.weight", "offset", 1))], None))
    q8 = ["quantize", "gguf", "--type", "Q8_0", "--out"]
    cases.append(("tensor-meta", "a missing tensor (quantize gguf)",
                  q8 + [str(d / "o-miss"), "--model", gfile(_drop_tensor(f32, "blk.1.ffn_down.weight"))], d / "o-miss"))
    cases.append(("tensor-meta", "no merges (quantize gguf)",
                  q8 + [str(d / "o-merges"), "--model", gfile(_drop_kv(f32, "tokenizer.ggml.merges"))], d / "o-merges"))
    cases.append(("tensor-meta", "an empty vocabulary (quantize gguf)",
                  q8 + [str(d / "o-vocab"), "--model", gfile(_drop_kv(f32, "tokenizer.ggml.tokens", empty=True))],
                  d / "o-vocab"))
    # integer dtypes where floats belong
    header, data = st_parts(small / "model.safetensors")
    h = json.loads(json.dumps(header))
    h[up]["dtype"] = "I32"
    cases.append(("dtype", "safetensors header I32 (same size)", ["eval", "perplexity", "--max-tokens", "64", "--max-length", "256", "--stride", "128", "--model",
                                                                   folder(model__safetensors=st_blob(h, data))], None))
    cases.append(("dtype", "GGUF I32 tensor", ["eval", "perplexity", "--max-tokens", "64", "--max-length", "256", "--stride", "128", "--model",
                                               gfile(_tensor_field(raw32, "blk.0.attn_k.weight", "type", 26))], None))
    # paths and environment
    gen = ["generate", "--prompt", "hi", "--model"]
    cases.append(("paths", "a 5,000-character path", gen + ["/tmp/" + "/".join(["a" * 200] * 25)], None))
    cases.append(("paths", "--model ~nonexistent_user/x", gen + ["~nonexistent_user/x"], None))
    cases.append(("paths", "--model /proc/self/mem", gen + ["/proc/self/mem"], None))
    cases.append(("paths", "--out ''", ["convert", "hf", "--model", str(small), "--out", ""], None))
    # parameters
    cases.append(("parameters31", "--max-length 2 --stride 2 --max-tokens 101",
                  ["eval", "perplexity", "--model", str(small), "--max-length", "2", "--stride", "2",
                   "--max-tokens", "101"], None))
    cases.append(("parameters31", "quantize int8 --granularity group --group-size 1e9",
                  ["quantize", "int8", "--model", str(small), "--granularity", "group", "--group-size", "1000000000",
                   "--out", str(d / "o-g")], d / "o-g"))
    cases.append(("parameters31", "imatrix --chunk-size 5000 (context 512)",
                  ["imatrix", "--model", str(small), "--chunk-size", "5000", "--out", str(d / "o-im2.gguf")],
                  d / "o-im2.gguf"))
    cases.append(("parameters31", "--imatrix given a model GGUF",
                  q8 + [str(d / "o-imm"), "--model", str(f32), "--imatrix", str(f32)], d / "o-imm"))
    return cases


def _drop_tensor(src: Path, name: str) -> bytes:
    import io

    import numpy as np

    from llmcourse.core.gguf_container import Tensor, read_gguf_header, write_gguf

    kvs, infos = read_gguf_header(src)
    data = src.read_bytes()
    tensors = [Tensor(t.name, t.shape, t.qtype, lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset))
               for t in infos if t.name != name]
    buf = io.BytesIO()
    write_gguf(buf, kvs, tensors)
    return buf.getvalue()


def _drop_kv(src: Path, key: str, empty: bool = False) -> bytes:
    """``src`` without the metadata ``key`` (or with it as an empty string array)."""
    import io

    import numpy as np

    from llmcourse.core.gguf_container import Tensor, read_gguf_header, write_gguf

    kvs, infos = read_gguf_header(src)
    data = src.read_bytes()
    tensors = [Tensor(t.name, t.shape, t.qtype, lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset))
               for t in infos]
    buf = io.BytesIO()
    from gguf import GGUFValueType as VT

    from llmcourse.core.gguf_container import KV

    kept = [kv for kv in kvs if kv.key != key] + ([KV(key, [], VT.ARRAY, VT.STRING)] if empty else [])
    write_gguf(buf, kept, tensors)
    return buf.getvalue()


def run(argv: list[str], env: dict) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=60, env=env,
                           errors="replace")
        return r.returncode, r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "timed out after 60 s", time.perf_counter() - t0


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the classes given, comma-separated (e.g. gguf,data)")
    ap.add_argument("--limit", type=float, default=LIMIT_S, help="seconds a case may take (default: %(default)s; "
                    "raise it on a loaded machine, where the start-up alone takes longer)")
    ap.add_argument("--match", default="", help="run only the examples whose label holds one of these texts (comma-separated)")
    ap.add_argument("--results", default="probe.md", help="file name under bench/results (default: %(default)s)")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cases = build(d)
        for cls, label, argv, out in cases:
            if (args.only and cls not in args.only.split(",")) or not any(m in label for m in args.match.split(",")):
                continue
            code, err, secs = run(argv, env)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            if label in EXPECT_RESULT:
                ok = code == 0 and "Traceback" not in err  # a computed result: no time limit
            else:
                ok = code == 2 and len(lines) == 1 and "Traceback" not in err and secs < args.limit
                ok = ok and (out is None or not out.exists())
            failures += not ok
            msg = lines[-1] if lines else ""
            rows.append((cls, label, code, len(lines), secs, ok, msg))
            print(f"{'ok ' if ok else 'BAD'} {secs:5.2f}s exit {code} [{cls}] {label}: {msg[:150]}", flush=True)
        os.chmod(d / "readonly", 0o700)
    text = [f"## Bad-input examples of issues 16 and 31, re-run as commands\n\n_{date.today()}, {machine()}_\n",
            f"Each case: a fresh `llmcourse` process (Python, torch and the model load included); pass = exit 2, "
            f"one line on stderr, no traceback, under {args.limit:.0f} s, no --out left (exit 0 for "
            f"{', '.join(sorted(EXPECT_RESULT))}: valid requests, a result is right).\n",
            "| class | example | exit | lines | s | pass | message |", "|---|---|---|---|---|---|---|"]
    for cls, label, code, nl, secs, ok, msg in rows:
        text.append(f"| {cls} | {label} | {code} | {nl} | {secs:.2f} | {'yes' if ok else '**no**'} | "
                    f"{msg.replace('|', '/')[:160]} |")
    times = sorted(r[4] for r in rows)
    text.append(f"\n{len(rows) - failures} of {len(rows)} pass; slowest {times[-1]:.2f} s, "
                f"median {times[len(times) // 2]:.2f} s.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.results).write_text("\n".join(text) + "\n")
    print(f"{len(rows) - failures}/{len(rows)} pass; wrote {RESULTS / args.results}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
