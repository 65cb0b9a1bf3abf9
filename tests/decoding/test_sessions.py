"""Weights shared, state per call: concurrent generations on one model equal their sequential results."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model

from llmcourse.core import runtime as rt
from llmcourse.core.runtime import DecodePlugin
from llmcourse.decoding import GenerationConfig, generate, prepare


def _run_in_threads(fns):
    results: list = [None] * len(fns)
    errors: list = []
    barrier = threading.Barrier(len(fns))

    def work(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("compile_env", ["0", "1"])
def test_two_concurrent_generations_equal_sequential(compile_env: str, monkeypatch) -> None:
    if compile_env == "1" and not rt.can_compile():
        pytest.skip("no C++ compiler for TorchInductor")
    monkeypatch.setenv("LLMCOURSE_COMPILE", compile_env)
    model = tiny_model("llama", seed=11)
    a, b = [5, 17, 33, 9], [7, 8, 100, 42, 3, 77]
    cfg_a = GenerationConfig(max_new_tokens=60, eos_token_ids=())
    cfg_b = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=50, eos_token_ids=())
    seq_a = generate(model, None, a, cfg_a).sequences[0].token_ids
    seq_b = generate(model, None, b, cfg_b).sequences[0].token_ids
    for _ in range(2):
        got_a, got_b = _run_in_threads([lambda: generate(model, None, a, cfg_a).sequences[0].token_ids,
                                        lambda: generate(model, None, b, cfg_b).sequences[0].token_ids])
        assert got_a == seq_a and got_b == seq_b
    # and the same prompt twice at once, through one shared FastModel
    assert len({id(prepare(model, "mm")), id(prepare(model, "mm"))}) == 1
    got = _run_in_threads([lambda: generate(model, None, a, cfg_a).sequences[0].token_ids] * 3)
    assert got == [seq_a] * 3


def test_sessions_do_not_share_state() -> None:
    model = tiny_model("llama", seed=12)
    fast = prepare(model, "mm")
    s1, s2 = fast.session(1, 16), fast.session(1, 16)
    with torch.inference_mode():
        l1 = s1.prefill(torch.tensor([[4, 5, 6]]))
        s2.prefill(torch.tensor([[9, 9, 9, 9, 9]]))  # another prompt in between
        n1 = s1.step(l1.argmax(-1))
    assert s1.pos == 4 and s2.pos == 5
    with torch.no_grad():
        ref = model(torch.tensor([[4, 5, 6, int(l1.argmax())]])).logits[:, -1]
    torch.testing.assert_close(n1, ref, rtol=0, atol=1e-4)


def test_int8_module_is_a_decode_plugin() -> None:
    from llmcourse.quant.int8 import Int8Config, quantize_model

    model = tiny_model("llama", seed=13)
    quantize_model(model, Int8Config(method="absmax", granularity="row"))
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, DecodePlugin) and not isinstance(torch.nn.Linear(2, 2), DecodePlugin)


def test_grouped_parts_dequantize_inside_the_product() -> None:
    """Per-group scales and zeros (the 4-bit form) give the de-quantized weight's product."""
    torch.manual_seed(0)
    o, i, g = 32, 64, 4
    q = torch.randint(0, 16, (o, i), dtype=torch.uint8)
    scale, zero = torch.rand(o, g) * 0.1, torch.randint(0, 16, (o, g)).float()
    x = torch.randn(3, i)
    w = (q.float().view(o, g, i // g) - zero[..., None]) * scale[..., None]
    ref = x @ w.view(o, i).T
    torch.testing.assert_close(rt.project(rt.GroupCodes(q, scale, zero), x), ref, rtol=1e-5, atol=1e-5)


def test_a_prompt_in_two_chunks_equals_one() -> None:
    """A multi-token forward after cached positions is causal inside the chunk too."""
    model = tiny_model("llama", seed=14)
    fast = prepare(model, "mm")
    ids = torch.tensor([[4, 9, 17, 3, 22, 8, 5]])
    with torch.inference_mode():
        s = fast.session(1, 16)
        s.prefill(ids[:, :3])
        s.forward(ids[:, 3:6])  # positions 3..5 must not see position 4.. from 3, etc.
        got = s.step(ids[:, 6])  # reads the chunk's cached keys and values
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
