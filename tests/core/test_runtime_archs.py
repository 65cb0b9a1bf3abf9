"""Every architecture of the runtime against transformers: logits, greedy tokens, batched serving, and the
one-definition rule (only core/runtime/layer.py computes attention or RoPE)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RUNTIME_ARCHS, tiny_model

from llmcourse.core import runtime as rt
from llmcourse.decoding import GenerationConfig, generate

SRC = Path(__file__).resolve().parents[2] / "src" / "llmcourse"
PROMPTS = [[5, 17, 33, 9], [7, 8, 100, 42, 3, 77, 19, 4, 12, 250], [3], [200, 201, 202, 203, 204, 205], [9, 9, 9, 9]]


def _stepped(fast: rt.FastModel, ids: torch.Tensor, first: int = 3) -> torch.Tensor:
    session = fast.session(ids.shape[0], ids.shape[1])
    got = [session.prefill(ids[:, :first])]
    for i in range(first, ids.shape[1]):
        got.append(session.step(ids[:, i]))
    return torch.stack(got, dim=1)


@pytest.mark.parametrize("arch", RUNTIME_ARCHS)
def test_logits_match_transformers_eager_and_compiled(arch: str) -> None:
    """Prompt then one step per token, past the tiny configs' sliding window of 8: within 1e-4 of
    transformers' forward on both paths (the products sum in another order, so not bit-identical)."""
    model = tiny_model(arch, seed=21)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits.float()[:, 2:]
    paths = ["mm"] + (["compiled"] if rt.can_compile() else [])
    for matvec in paths:
        fast = rt.FastModel(model, matvec=matvec)
        assert fast.matvec == matvec
        with torch.inference_mode():
            torch.testing.assert_close(_stepped(fast, ids), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", RUNTIME_ARCHS)
def test_greedy_32_tokens_equal_transformers_generate(arch: str) -> None:
    model = tiny_model(arch, seed=22)
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        out = generate(model, None, prompt, GenerationConfig(max_new_tokens=32, eos_token_ids=()))
        assert out.backend == "fast"
        assert out.sequences[0].token_ids == ref[0, len(prompt):].tolist(), prompt


@pytest.mark.parametrize("arch", RUNTIME_ARCHS)
def test_batched_slots_equal_sequential(arch: str) -> None:
    """Slots at different positions in one step (the server's batch) give each prompt's own greedy tokens."""
    from llmcourse.serve.batch import BatchSession

    model = tiny_model(arch, seed=23)
    prompts = PROMPTS[:4]
    want = [generate(model, None, p, GenerationConfig(max_new_tokens=12, eos_token_ids=())).sequences[0].token_ids
            for p in prompts]
    s = BatchSession(rt.FastModel(model, matvec="mm"), len(prompts), 64)
    slots = [s.acquire() for _ in prompts]
    nxt = [int(s.prefill(slot, p).argmax(-1)) for slot, p in zip(slots, prompts, strict=True)]
    got = [[t] for t in nxt]
    for _ in range(11):
        logits = s.step(slots, torch.tensor(nxt))
        nxt = logits.argmax(-1).tolist()
        for g, t in zip(got, nxt, strict=True):
            g.append(t)
    assert got == want


def test_unsupported_architecture_is_one_line(tmp_path) -> None:
    """A Mamba folder: one line naming the supported architectures, exit 2."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    MambaForCausalLM(cfg).save_pretrained(tmp_path / "mamba")
    for name in ("tokenizer.json",):
        (tmp_path / "mamba" / name).write_text(json.dumps({}))
    r = subprocess.run([sys.executable, "-m", "llmcourse.cli", "generate", "--model", str(tmp_path / "mamba"),
                        "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'mamba' is not supported" in lines[0] and "gemma3_text" in lines[0]
    with pytest.raises(Exception, match="not supported"):
        rt.check_supported("mamba")


FORBIDDEN_CALLS = {"scaled_dot_product_attention", "rotate_half", "apply_rope", "write_cache", "rsqrt"}


def test_one_definition_of_the_decoder_layer() -> None:
    """Attention, RoPE, the cache write and the norm are computed in core/runtime/layer.py only (no other
    module calls or defines them)."""
    home = SRC / "core" / "runtime" / "layer.py"
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == home:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            elif isinstance(node, ast.FunctionDef):
                name = node.name
            if name in FORBIDDEN_CALLS or (isinstance(node, ast.FunctionDef) and name in ("attention", "decoder_layer")):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("arch", RUNTIME_ARCHS)
def test_int8_and_gptq_quantize_and_run(arch: str) -> None:
    """The quantization labs on every architecture: their modules plug into the runtime's step, whose
    greedy tokens equal transformers' loop over the same quantized modules."""
    from llmcourse.quant.gptq import GPTQConfig
    from llmcourse.quant.gptq import quantize_model as gptq_quantize
    from llmcourse.quant.int8 import Int8Config
    from llmcourse.quant.int8 import quantize_model as int8_quantize

    prompt = PROMPTS[1]
    windows = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for name, quantize in (("int8", lambda m: int8_quantize(m, Int8Config(method="absmax", granularity="row"))),
                           ("gptq", lambda m: gptq_quantize(m, windows, GPTQConfig(bits=4, group_size=32)))):
        model = tiny_model(arch, seed=24)
        quantize(model)
        assert rt.compilable(model), name
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        out = generate(model, None, prompt, GenerationConfig(max_new_tokens=16, eos_token_ids=()))
        assert out.backend == "fast"
        assert out.sequences[0].token_ids == ref[0, len(prompt):].tolist(), name


@pytest.mark.slow
def test_real_gemma3_greedy_equals_transformers() -> None:
    """The second real model (Gemma 3 270M): 32 greedy tokens identical to transformers' generate() on 5
    prompts; logits within 1e-4 on both step paths."""
    from llmcourse.core.models import load_model

    lm = load_model("gemma3")
    model, tok = lm.model, lm.tokenizer
    assert model.config.model_type == "gemma3_text"
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time",
               "The chemical symbol for gold is"]
    for text in prompts:
        ids = tok(text).input_ids
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        out = generate(model, tok, ids, GenerationConfig(max_new_tokens=32, eos_token_ids=()))
        assert out.backend == "fast" and out.sequences[0].token_ids == ref[0, len(ids):].tolist(), text
    ids = torch.tensor([tok(prompts[0]).input_ids])
    with torch.no_grad():
        want = model(ids).logits.float()[:, 2:]
    for matvec in ["mm"] + (["compiled"] if rt.can_compile() else []):
        with torch.inference_mode():
            torch.testing.assert_close(_stepped(rt.FastModel(model, matvec=matvec), ids), want, rtol=0, atol=1e-4)
