"""Fuzz: truncated and corrupted GGUF / safetensors give the clean one-line error, never a crash or a hang."""

from __future__ import annotations

import io
import json
import math
import random
import struct

import numpy as np
import pytest
import torch
from conftest import tiny_model
from fuzz_guard import Hang, MemorySpike, guarded
from gguf import GGUFValueType as VT
from tiny_gguf import write_tiny_llama_gguf

from llmcourse.core.errors import UserError
from llmcourse.core.gguf_container import KV, Tensor, read_gguf_header, write_gguf
from llmcourse.core.models import load_model

N_CASES = 300  # byte-level mutations per format


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    model = tiny_model("llama", vocab_size=256)
    write_tiny_llama_gguf(model, d / "tiny.gguf")
    hf = d / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    load_model(str(d / "tiny.gguf")).tokenizer.save_pretrained(hf)
    return d / "tiny.gguf", hf


def mutations(data: bytes, rng: random.Random, header_len: int):
    """Yield (label, bytes): truncations, byte flips, overwritten length fields, random noise."""
    n = len(data)
    cuts = [0, 1, 3, 4, 7, 8, 12, 16, 23, 24, header_len - 1, header_len, n - 1, n // 2]
    cuts += [rng.randrange(0, n) for _ in range(N_CASES // 3)]
    for c in cuts:
        yield f"truncate@{c}", data[:c]
    while True:
        kind = rng.choice(["flip", "flip", "u64", "noise", "zero"])
        b = bytearray(data)
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(0, min(n, header_len + 64))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == "u64":
            i = rng.randrange(0, max(1, min(n, header_len) - 8))
            b[i:i + 8] = struct.pack("<Q", rng.choice([0, 2**32, 2**63, 2**64 - 1, rng.randrange(2**40)]))
        elif kind == "zero":
            i = rng.randrange(0, min(n, header_len))
            b[i:i + 64] = bytes(len(b[i:i + 64]))
        else:
            b = bytearray(rng.randbytes(rng.randint(0, 4096)))
        yield kind, bytes(b)


def run_case(path):
    """Load; success (a corruption of weights only) or UserError are fine. Anything else fails.

    Run under the fuzz guard: over 30 s raises Hang, over 2 GB of resident memory MemorySpike."""
    try:
        with guarded(30):
            lm = load_model(str(path))
            lm.model(torch.tensor([[1, 2, 3]]))
        return "loaded"
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 700, msg
        assert ":" in msg  # problem: fix
        return "error"


def gguf_header_len(path) -> int:
    import gguf

    r = gguf.GGUFReader(str(path))
    return int(r.data_offset)


def test_fuzz_gguf(tiny_files, tmp_path):
    gguf_path, _ = tiny_files
    data = gguf_path.read_bytes()
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "error": 0}
    for i, (label, blob) in zip(range(N_CASES), mutations(data, rng, gguf_header_len(gguf_path)), strict=False):
        p = tmp_path / f"case{i}.gguf"
        p.write_bytes(blob)
        try:
            outcomes[run_case(p)] += 1
        except (Hang, MemorySpike) as e:
            pytest.fail(f"GGUF case {i} ({label}): {type(e).__name__} {e}")
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"GGUF case {i} ({label}) raised {type(e).__name__}: {e}")
        p.unlink()
    print(f"\ngguf byte mutations: {outcomes}")
    assert outcomes["error"] >= N_CASES // 2


def _case_dir(hf, tmp_path, mutated: str, link: bool = False):
    """A copy of the folder ``hf`` (or links to its files) without ``mutated``, which each case writes."""
    case_dir = tmp_path / "m"
    case_dir.mkdir()
    for f in hf.iterdir():
        if f.name != mutated:
            if link:
                (case_dir / f.name).symlink_to(f)
            else:
                (case_dir / f.name).write_bytes(f.read_bytes())
    return case_dir


def test_fuzz_safetensors(tiny_files, tmp_path):
    _, hf = tiny_files
    st = hf / "model.safetensors"
    data = st.read_bytes()
    header_len = 8 + struct.unpack("<Q", data[:8])[0]
    rng = random.Random(99)
    outcomes = {"loaded": 0, "error": 0}
    case_dir = _case_dir(hf, tmp_path, "model.safetensors")
    for i, (label, blob) in zip(range(N_CASES), mutations(data, rng, header_len), strict=False):
        (case_dir / "model.safetensors").write_bytes(blob)
        try:
            outcomes[_run_st(case_dir)] += 1
        except (Hang, MemorySpike) as e:
            pytest.fail(f"safetensors case {i} ({label}): {type(e).__name__} {e}")
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"safetensors case {i} ({label}) raised {type(e).__name__}: {e}")
    print(f"\nsafetensors byte mutations: {outcomes}")
    assert outcomes["error"] >= N_CASES // 2
    # corrupted key names used to "load" with random weights; since issue 17 they are refused, so none need load


def _run_st(case_dir):
    try:
        return run_case(case_dir)
    except UserError:
        return "error"


def test_clean_files_load(tiny_files):
    gguf_path, hf = tiny_files
    assert run_case(gguf_path) == "loaded"
    assert run_case(hf) == "loaded"


# --- structured cases (issue 16): values a parser accepts but no working model has ---------------

N_GGUF_META = 400
N_ST_HEADER = 300
N_CONFIG = 200


def _gguf_with(src, kv_edit=None, tensors_edit=None):
    """The bytes of ``src`` re-written with its metadata and/or tensor list edited."""



    kvs, infos = read_gguf_header(src)
    data = src.read_bytes()
    tensors = [Tensor(t.name, t.shape, t.qtype, lambda t=t: np.frombuffer(data, np.uint8, t.nbytes, t.offset))
               for t in infos]
    kvs = kv_edit(kvs) if kv_edit else kvs
    tensors = tensors_edit(tensors) if tensors_edit else tensors
    buf = io.BytesIO()
    write_gguf(buf, kvs, tensors)
    return buf.getvalue()


def _patch_tensor_info(blob: bytes, name: str, field: str, value: int) -> bytes:
    """Overwrite ne[0] (``field="dim"``) or the type (``field="type"``) of tensor ``name`` in the header."""
    enc = struct.pack("<Q", len(name)) + name.encode()
    i = blob.index(enc) + len(enc)
    (n_dims,) = struct.unpack_from("<I", blob, i)
    b = bytearray(blob)
    if field == "dim":
        struct.pack_into("<Q", b, i + 4, value)
    else:
        struct.pack_into("<I", b, i + 4 + 8 * n_dims, value)
    return bytes(b)


def gguf_meta_cases(src, rng: random.Random):
    """(class, bytes) of GGUFs whose metadata cannot describe a working model: every one must be refused."""


    def setkv(key, value, vtype):
        return lambda kvs: [*[kv for kv in kvs if kv.key != key], KV(key, value, vtype)]

    big = [0, -1, -(2**31), 2**31, 2**32 - 1, 2**40, 2**63 - 1]
    makers = [
        ("alignment", None),
        ("block_count_str", lambda: setkv("llama.block_count", rng.choice(["2", "", "two"]), VT.STRING)),
        ("block_count", lambda: setkv("llama.block_count", rng.choice([0, -1, -5, 2**31 - 1, 1, 3, 7]), VT.INT32)),
        ("block_count_u64", lambda: setkv("llama.block_count", rng.choice([2**31, 2**63, 2**64 - 1]), VT.UINT64)),
        ("head_count", lambda: setkv("llama.attention.head_count", rng.choice([0, 3, 5, 7, 2**31 - 1, -4]),
                                     VT.INT32)),
        ("head_count_kv", lambda: setkv("llama.attention.head_count_kv", rng.choice([0, 3, -1]), VT.INT32)),
        ("embedding_length", lambda: setkv("llama.embedding_length", rng.choice(big + [63, 65]), VT.INT64)),
        ("context_length", lambda: setkv("llama.context_length", rng.choice([0, -1, 2**40]), VT.INT64)),
        ("token_id", lambda: setkv(f"tokenizer.ggml.{rng.choice(['bos', 'eos', 'padding', 'unknown'])}_token_id",
                                   rng.choice([10**9, 256, 2**32 - 1]), VT.UINT32)),
        ("float", lambda: setkv("llama.attention.layer_norm_rms_epsilon",
                                rng.choice([float("nan"), float("inf"), -float("inf")]), VT.FLOAT32)),
        ("architecture", lambda: setkv("general.architecture", rng.choice(["falcon", "", "llama2", "mamba"]),
                                       VT.STRING)),
    ]
    for _ in range(N_GGUF_META):
        kind = rng.randrange(len(makers) + 4)
        if kind == 0:  # the writer refuses a bad alignment: write 32, then patch the value in place
            blob = _gguf_with(src, setkv("general.alignment", 32, VT.UINT32))
            key = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<I", VT.UINT32)
            i = blob.index(key) + len(key)
            bad = rng.choice([0, 3, 5, 6, 7, 24, 33, 100, 2**31 + 1])
            yield "alignment", blob[:i] + struct.pack("<I", bad) + blob[i + 4:]
        elif kind < len(makers):
            label, make = makers[kind]
            yield label, _gguf_with(src, make())
        elif kind == len(makers):
            yield "n_tensors_0", _gguf_with(src, tensors_edit=lambda ts: [])
        elif kind == len(makers) + 1:
            drop = rng.randrange(len(read_gguf_header(src)[1]))
            yield "missing_tensor", _gguf_with(src, tensors_edit=lambda ts, drop=drop: ts[:drop] + ts[drop + 1:])
        elif kind == len(makers) + 2:
            yield "dim_2^63", _patch_tensor_info(src.read_bytes(), "token_embd.weight", "dim",
                                                 rng.choice([2**63, 2**64 - 1, 2**41, 0]))
        else:  # a K-quant type on rows of 64 values (K-quants need multiples of 256)
            yield "kquant_row", _patch_tensor_info(src.read_bytes(), "blk.0.attn_q.weight", "type",
                                                   rng.choice([10, 11, 12, 13, 14]))


def _st_blob(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def st_header_cases(st, rng: random.Random):
    """(class, bytes) of safetensors whose header parses but lies: every one must be refused."""
    blob = st.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    rect = [k for k in names if len(header[k]["shape"]) == 2 and header[k]["shape"][0] != header[k]["shape"][1]]
    for _ in range(N_ST_HEADER):
        h = json.loads(json.dumps(header))
        name = rng.choice(names)
        kind = rng.choice(["duplicate", "dtype_lower", "dtype_int", "overlap", "gap", "trailing", "transposed",
                           "dtype_unknown"])
        if kind == "duplicate":
            text = json.dumps(h)
            entry = json.dumps({name: h[name]})[1:-1]
            yield kind, _st_blob(text[:-1] + ", " + entry + "}", data)
            continue
        if kind == "dtype_lower":
            h[name]["dtype"] = h[name]["dtype"].lower()
        elif kind == "dtype_int":
            h[name]["dtype"] = rng.choice([0, 1, 4, 32])
        elif kind == "dtype_unknown":
            h[name]["dtype"] = rng.choice(["F31", "FP32", "float32", "F 32", "Q4_0"])
        elif kind == "overlap":
            s, e = h[name]["data_offsets"]
            shift = rng.choice([4, 8, 64]) if s >= 64 else 0
            if shift == 0:
                other = next(k for k in names if h[k]["data_offsets"][0] >= 64)
                s, e = h[other]["data_offsets"]
                name, shift = other, 4
            h[name]["data_offsets"] = [s - shift, e - shift]
        elif kind == "gap":
            s0 = h[name]["data_offsets"][0]
            for k in names:
                s, e = h[k]["data_offsets"]
                if s >= s0:
                    h[k]["data_offsets"] = [s + 4, e + 4]
            yield kind, _st_blob(h, data + b"\0" * 4)
            continue
        elif kind == "trailing":
            yield kind, blob + rng.randbytes(rng.choice([1, 4, 100]))
            continue
        else:
            name = rng.choice(rect)
            h[name]["shape"] = h[name]["shape"][::-1]
        yield kind, _st_blob(h, data)


def config_cases(config: dict, rng: random.Random):
    """(class, config dict) of config.json values no working model has: every one must be refused."""
    edits = [
        ("heads_0", {"num_attention_heads": 0}),
        ("heads_not_dividing", {"num_attention_heads": rng.choice([3, 5, 7])}),
        ("kv_heads_not_dividing", {"num_key_value_heads": 3}),
        ("hidden_null", {"hidden_size": None}),
        ("hidden_str", {"hidden_size": "64"}),
        ("vocab_2^31", {"vocab_size": 2**31}),
        ("layers_negative", {"num_hidden_layers": rng.choice([-1, -30])}),
        ("layers_more", {"num_hidden_layers": rng.choice([3, 4, 100])}),
        ("intermediate", {"intermediate_size": rng.choice([0, -5, 65])}),
        ("model_type", {"model_type": rng.choice(["qwen2", "gpt2", "bert", "t5"])}),
    ]
    for _ in range(N_CONFIG):
        label, edit = rng.choice(edits)
        yield label, {**config, **edit}


def _expect_error(label: str, run, counts: dict) -> None:
    try:
        outcome = run()
    except (Hang, MemorySpike) as e:
        pytest.fail(f"{label}: {type(e).__name__} {e}")
    except UserError:
        outcome = "error"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label} raised {type(e).__name__}: {e}")
    if outcome != "error":
        pytest.fail(f"{label} loaded a file that cannot describe a working model")
    counts[label.split(":")[0]] = counts.get(label.split(":")[0], 0) + 1


COUNTS: dict[str, dict[str, int]] = {}


def test_fuzz_gguf_metadata(tiny_files, tmp_path):
    gguf_path, _ = tiny_files
    counts: dict[str, int] = {}
    p = tmp_path / "case.gguf"
    for i, (label, blob) in enumerate(gguf_meta_cases(gguf_path, random.Random(2026))):
        p.write_bytes(blob)
        _expect_error(f"{label}:{i}", lambda: run_case(p), counts)
    COUNTS["gguf_meta"] = counts
    print(f"\ngguf_meta cases: {counts}")
    assert sum(counts.values()) == N_GGUF_META and len(counts) >= 14, counts


def test_fuzz_safetensors_headers(tiny_files, tmp_path):
    _, hf = tiny_files
    case_dir = _case_dir(hf, tmp_path, "model.safetensors")
    counts: dict[str, int] = {}
    for i, (label, blob) in enumerate(st_header_cases(hf / "model.safetensors", random.Random(7))):
        (case_dir / "model.safetensors").write_bytes(blob)
        _expect_error(f"{label}:{i}", lambda: run_case(case_dir), counts)
    COUNTS["safetensors_header"] = counts
    print(f"\nsafetensors_header cases: {counts}")
    assert sum(counts.values()) == N_ST_HEADER and len(counts) == 8, counts


def test_fuzz_config_values(tiny_files, tmp_path):
    _, hf = tiny_files
    case_dir = _case_dir(hf, tmp_path, "config.json", link=True)
    config = json.loads((hf / "config.json").read_text())
    counts: dict[str, int] = {}
    for i, (label, cfg) in enumerate(config_cases(config, random.Random(11))):
        (case_dir / "config.json").write_text(json.dumps(cfg))
        _expect_error(f"{label}:{i}", lambda: run_case(case_dir), counts)
    COUNTS["config"] = counts
    print(f"\nconfig cases: {counts}")
    assert sum(counts.values()) == N_CONFIG and len(counts) == 10, counts


def test_case_count_at_least_1000():
    """The generated cases in all (byte mutations + structured): the issue asks for at least 1,000."""
    assert 2 * N_CASES + N_GGUF_META + N_ST_HEADER + N_CONFIG >= 1000
    assert N_TEMPLATES + N_NONFINITE + N_LYING + N_DTYPES >= 200  # issue 31's classes


# --- issue 31: hostile chat templates, NaN/Inf weights, lying tensor metadata, integer dtypes ------------------

N_TEMPLATES = 80
N_NONFINITE = 24
N_LYING = 80
N_DTYPES = 20


def template_cases(rng: random.Random):
    """(class, template) of chat templates that are hostile or broken: every one must end in one line."""
    big = rng.choice
    makers = {
        "ssti": lambda: big(["{{ cycler.__init__.__globals__.os.popen('id').read() }}",
                             "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ joiner.__init__.__globals__ }}",
                             "{{ lipsum.__globals__['os'].system('true') }}", "{{ namespace.__init__.__globals__ }}",
                             "{{ self._TemplateReference__context }}", "{{ messages.__class__.__base__ }}",
                             "{% set ns = namespace(_x=1) %}{{ ns._x }}"]),
        "include": lambda: big(["{% include 'x' %}", "{% import 'x' as y %}", "{% from 'x' import y %}",
                                "{% extends 'base.jinja' %}", "{% include messages[0].content %}"]),
        "raise": lambda: "{{ raise_exception('" + big(["no system role", "", "x" * 300]) + "') }}",
        "syntax": lambda: big(["{% for %}", "{{ }", "{% if x %}", "{% endfor %}", "{{ 1 +* 2 }}",
                               "{% macro %}", "{{ messages[ }}", "{% generation %}x"]),
        "undefined": lambda: big(["{{ foo.bar }}", "{{ messages[10].content.upper() }}",
                                  "{{ messages[0].nope.deeper }}", "{{ undefined_macro() }}"]),
        "string_bomb": lambda: big(["{{ 'x' * 10**10 }}", "{{ 'x' * 2**62 }}", "{{ [1] * 10**9 }}",
                                    "{{ 'ab'|center(1000000000) }}", "{{ 'x'.ljust(10**9) }}",
                                    "{{ 'a\nb'|indent(1000000000) }}", "{{ '%099999999d' % 1 }}",
                                    "{{ '{:>999999999}'.format(1) }}", "{{ ('x' * 1000)|replace('', 'y' * 5000) }}",
                                    "{{ ('x' * 5000).replace('x', 'y' * 5000) }}", "{{ 'x'|tojson(indent=10**9) }}",
                                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                                    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                    "{% set ns.s = ns.s + ns.s %}{% endfor %}", "{{ 7 ** 99999999 }}"]),
        "recursion": lambda: big(["{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                                  "{% macro f(n) %}{{ f(n + 1) }}x{% endmacro %}{{ f(0) }}"]),
        "loop_bomb": lambda: big(["{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                                  "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                                  "{% for c in 'x' * 90000 %}{% for d in 'y' * 90000 %}{% endfor %}{% endfor %}"]),
        "too_large": lambda: "{# " + "x" * rng.choice([300_000, 2_000_000]) + " #}",
        "runtime": lambda: big(["{{ 1 / 0 }}", "{{ messages + 1 }}", "{{ 'a' - 1 }}", "{{ messages|int + none }}",
                                "{{ range(10**9)|list }}"]),
    }
    kinds = sorted(makers)
    for i in range(N_TEMPLATES):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        yield kind, makers[kind]()


def test_fuzz_chat_templates():
    """Every hostile or broken template ends in one line naming where it came from, within a 0.5 s budget here
    (the CLI's is 5 s: tested once in test_fuzz_inputs), never a traceback, hang or memory spike."""
    from llmcourse.core.chat_template import render_chat

    counts: dict[str, int] = {}
    messages = [{"role": "user", "content": "hi"}]
    for i, (label, tpl) in enumerate(template_cases(random.Random(31))):
        def run(tpl=tpl):
            with guarded(10, max_bytes=1 << 30):
                render_chat(tpl, "model/chat_template.jinja", messages, variables={"bos_token": "<s>"}, seconds=0.5)
            return "rendered"
        _expect_error(f"{label}:{i}", run, counts)
    COUNTS["chat_template"] = counts
    print(f"\nchat_template cases: {counts}")
    assert sum(counts.values()) == N_TEMPLATES and len(counts) == 10, counts


def test_chat_template_errors_name_the_file_and_the_ids_match_transformers(tiny_files, tmp_path):
    from llmcourse.core.chat_template import chat_ids

    _, hf = tiny_files
    tok = load_model(str(hf)).tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert chat_ids(tok, msgs) == list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"])
    tok.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(UserError, match="chat_template") as e:
        chat_ids(tok, msgs)
    assert str(hf) in str(e.value) and "\n" not in str(e.value)


def _nonfinite_st(hf, case_dir, rng: random.Random):
    from safetensors.torch import load_file, save_file

    state = load_file(str(hf / "model.safetensors"))
    name = rng.choice(sorted(state))
    t = state[name].clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    save_file({**state, name: t}, str(case_dir / "model.safetensors"), metadata={"format": "pt"})
    return name


def _gguf_data_patch(src, name: str, index: int, value: float) -> bytes:
    """``src``'s bytes with element ``index`` of the F32 tensor ``name`` set to ``value``."""
    _, infos = read_gguf_header(src)
    t = next(t for t in infos if t.name == name)
    b = bytearray(src.read_bytes())
    struct.pack_into("<f", b, t.offset + 4 * index, value)
    return bytes(b)


def test_fuzz_nonfinite_weights(tiny_files, tmp_path):
    """NaN/Inf in one weight of a safetensors folder or an F32 GGUF: loading, and quantizing the GGUF, are refused
    in one line naming the tensor; nothing is left at the output."""
    from llmcourse.quant.gguf.presets import quantize_gguf

    gguf_path, hf = tiny_files
    rng = random.Random(5)
    case_dir = _case_dir(hf, tmp_path, "model.safetensors", link=True)
    _, infos = read_gguf_header(gguf_path)
    counts: dict[str, int] = {}
    for i in range(N_NONFINITE):
        if i % 3 == 0:
            name = _nonfinite_st(hf, case_dir, rng)
            label, run = "safetensors", lambda: run_case(case_dir)
        else:
            t = rng.choice(infos)
            name = t.name
            p = tmp_path / "nan.gguf"
            p.write_bytes(_gguf_data_patch(gguf_path, name, rng.randrange(math.prod(t.shape)),
                                           rng.choice([float("nan"), float("inf"), -float("inf")])))
            out = tmp_path / "q.gguf"
            if i % 3 == 1:
                label, run = "gguf_load", lambda p=p: run_case(p)
            else:
                def run(p=p, out=out):
                    quantize_gguf(p, out, "Q8_0")
                    return "wrote"
                label = "gguf_quantize"
        try:
            with guarded(30):
                outcome = run()
        except UserError as e:
            assert name in str(e) and "\n" not in str(e), str(e)
            outcome = "error"
        assert outcome == "error", f"{label}:{i} ({name}) accepted a non-finite weight"
        assert not (tmp_path / "q.gguf").exists() and not list(tmp_path.glob(".q.gguf*"))
        counts[label] = counts.get(label, 0) + 1
    COUNTS["nonfinite"] = counts
    print(f"\nnonfinite cases: {counts}")


def _patch_tensor_field(blob: bytes, name: str, field: str, value: int) -> bytes:
    """Overwrite the type (u32) or the offset (u64) of tensor ``name`` in the header."""
    enc = struct.pack("<Q", len(name)) + name.encode()
    i = blob.index(enc) + len(enc)
    (n_dims,) = struct.unpack_from("<I", blob, i)
    b = bytearray(blob)
    at = i + 4 + 8 * n_dims
    if field == "type":
        struct.pack_into("<I", b, at, value)
    else:
        (old,) = struct.unpack_from("<Q", b, at + 4)
        struct.pack_into("<Q", b, at + 4, max(0, old + value))
    return bytes(b)


def lying_cases(src, rng: random.Random):
    """(class, bytes) of GGUFs whose tensor list or tokenizer lies: every one must be refused before any read."""
    from gguf import GGMLQuantizationType as QT

    blob = src.read_bytes()
    _, infos = read_gguf_header(src)
    names = [t.name for t in infos]
    blocks = [n for n in names if n.startswith("blk.")]

    def setkv(key, value, vtype, sub=None):
        return lambda kvs: [*[kv for kv in kvs if kv.key != key], KV(key, value, vtype, sub)]

    def dropkv(key):
        return lambda kvs: [kv for kv in kvs if kv.key != key]

    for i in range(N_LYING):
        kind = ["type", "offset", "missing_tensor", "tokenizer"][i % 4]
        if kind == "type":
            qt = rng.choice([QT.Q4_0, QT.F16, QT.Q8_0, QT.BF16, QT.Q4_1, QT.Q5_0])
            yield f"type_{qt.name}", _patch_tensor_field(blob, rng.choice(names), "type", int(qt))
        elif kind == "offset":
            yield "offset", _patch_tensor_field(blob, rng.choice(names[1:]), "offset", rng.choice([1, -1, 2, 32, -32]))
        elif kind == "missing_tensor":
            drop = rng.choice(blocks + ["output_norm.weight"])
            yield "missing_tensor", _gguf_with(src, tensors_edit=lambda ts, d=drop: [t for t in ts if t.name != d])
        else:
            edit = rng.choice([("no_merges", dropkv("tokenizer.ggml.merges")),
                               ("empty_merges", setkv("tokenizer.ggml.merges", [], VT.ARRAY, VT.STRING)),
                               ("empty_vocab", setkv("tokenizer.ggml.tokens", [], VT.ARRAY, VT.STRING)),
                               ("no_vocab", dropkv("tokenizer.ggml.tokens")),
                               ("spm_without_scores", lambda kvs: dropkv("tokenizer.ggml.scores")(
                                   setkv("tokenizer.ggml.model", "llama", VT.STRING)(kvs)))])
            yield edit[0], _gguf_with(src, edit[1])


def test_fuzz_lying_tensor_metadata(tiny_files, tmp_path):
    """Types, offsets, tensor lists and tokenizer fields that lie: refused by the header checks, before any
    tensor is read (loading) and before ``quantize gguf`` writes anything."""
    from llmcourse.core.formats import read_gguf_model

    gguf_path, _ = tiny_files
    counts: dict[str, int] = {}
    p = tmp_path / "case.gguf"
    for i, (label, blob) in enumerate(lying_cases(gguf_path, random.Random(77))):
        p.write_bytes(blob)
        _expect_error(f"{label}:{i}", lambda: (read_gguf_model(p), "read")[1], counts)
        if i < 12:  # the whole load and the command path too, on a sample
            _expect_error(f"{label}:{i}", lambda: run_case(p), {})
    COUNTS["lying_metadata"] = counts
    print(f"\nlying tensor metadata cases: {counts}")
    assert sum(counts.values()) == N_LYING and len(counts) >= 10, counts


def test_fuzz_integer_dtypes(tiny_files, tmp_path):
    """An integer dtype where a float weight belongs (same byte size, so every size check passes)."""
    gguf_path, hf = tiny_files
    rng = random.Random(3)
    st = (hf / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", st[:8])[0]
    header, data = json.loads(st[8:8 + n]), st[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    case_dir = _case_dir(hf, tmp_path, "model.safetensors", link=True)
    p = tmp_path / "int.gguf"
    _, infos = read_gguf_header(gguf_path)
    counts: dict[str, int] = {}
    for i in range(N_DTYPES):
        if i % 2:
            h = json.loads(json.dumps(header))
            h[rng.choice(names)]["dtype"] = "I32"
            (case_dir / "model.safetensors").write_bytes(_st_blob(h, data))
            _expect_error(f"safetensors_I32:{i}", lambda: _run_st(case_dir), counts)
        else:
            p.write_bytes(_patch_tensor_field(gguf_path.read_bytes(), rng.choice(infos).name, "type", 26))  # I32
            _expect_error(f"gguf_I32:{i}", lambda: run_case(p), counts)
    COUNTS["dtypes"] = counts
    print(f"\ninteger dtype cases: {counts}")
    assert counts == {"safetensors_I32": N_DTYPES // 2, "gguf_I32": N_DTYPES // 2}, counts
