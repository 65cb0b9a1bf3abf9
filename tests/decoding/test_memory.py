"""The eager ("mm") fast path holds the model's own weights, never a second (transposed) copy."""

from __future__ import annotations

import torch
from conftest import tiny_model

from llmcourse.core.runtime import FastModel
from llmcourse.core.runtime import weights as rt_weights
from llmcourse.decoding import GenerationConfig, generate


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _held_tensors(fast: FastModel) -> list[torch.Tensor]:
    """Every tensor the FastModel keeps for its eager step (projections, norms, head)."""
    held = [fast.norm]
    for layer in fast.layers:
        held += [layer.n1, layer.n2]
        for proj in (*layer.qkv, layer.o, *layer.gate_up, layer.down):
            held += [proj.weight] + ([proj.bias] if proj.bias is not None else [])
    return held + [fast.head_eager.weight]


def test_eager_path_keeps_no_copy_of_the_weights() -> None:
    model = tiny_model("qwen2", seed=1)  # q/k/v biases and an untied head: every kind of tensor
    fast = FastModel(model, matvec="mm")
    params = _storages([*model.parameters(), *model.buffers()])
    held = _held_tensors(fast)
    assert held and _storages(held) <= params  # views of the model's own storages, nothing new
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    session = fast.session(1, 16)
    cache = sum(t.numel() * t.element_size() for t in session.k_cache + session.v_cache)
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert cache == 2 * cfg.num_hidden_layers * 16 * kv * 4  # exactly the positions asked for (fp32)
    assert cache < weight_bytes


def test_matvec_matches_linear_for_one_to_several_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    for o, rows in ((64, 1), (64, 3), (60, 1), (64, 12)):  # chunked bmm, beams, odd size, a prompt
        w = torch.randn(o, 24, generator=gen)
        x = torch.randn(rows, 24, generator=gen)
        torch.testing.assert_close(rt_weights.matvec(w, x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(1, 5, 24, generator=gen)  # a short prompt (B, T, H)
    torch.testing.assert_close(rt_weights.matvec(w, x3), torch.nn.functional.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_eager_generation_matches_transformers_greedy() -> None:
    model = tiny_model("llama", seed=2)
    ids = [5, 9, 17, 3]
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 4:]
    out = generate(FastModel(model, matvec="mm"), None, ids, GenerationConfig(max_new_tokens=8, eos_token_ids=()))
    assert out.sequences[0].token_ids == ref.tolist()
