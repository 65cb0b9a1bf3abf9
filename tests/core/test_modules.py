"""Shared model traversal: linear layers (Conv1D-aware), tied embeddings, input hooks, block-by-block forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llmcourse.core import modules as M


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_linear_layers_and_weights_are_out_by_in(arch: str) -> None:
    model = tiny_model(arch)
    layers = M.linear_layers(model)
    assert layers and all(M.is_linear(m) for _, m in layers)
    for _, m in layers:
        w = M.linear_weight(m)
        x = torch.randn(3, w.shape[1])
        torch.testing.assert_close(m(x) - (m.bias if getattr(m, "bias", None) is not None else 0), x @ w.T,
                                   rtol=1e-5, atol=1e-5)
    names = [n for n, _ in M.linear_layers(model, skip=["lm_head"])]
    assert "lm_head" not in names


def test_tied_embeddings_and_set_module() -> None:
    tied = tiny_model("llama")  # tie_word_embeddings=True
    assert M.tied_embeddings(tied) == ("model.embed_tokens", "lm_head")
    assert M.tied_embeddings(tiny_model("qwen2")) == (None, None)
    assert M.output_head(tied)[0] == "lm_head"
    new = torch.nn.Linear(64, 64, bias=False)
    M.set_module(tied, "model.layers.0.self_attn.q_proj", new)
    assert tied.model.layers[0].self_attn.q_proj is new


def test_input_hooks_see_every_token_and_are_removed() -> None:
    model = tiny_model("llama")
    mods = dict(M.linear_layers(model)[:3])
    seen: dict[str, int] = {}
    ids = torch.randint(3, 200, (2, 7))
    with M.input_hooks(mods, lambda n, x: seen.__setitem__(n, seen.get(n, 0) + x.shape[0])):
        model(ids)
    assert seen == {n: 14 for n in mods}
    model(ids)
    assert all(not m._forward_hooks for m in mods.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_by_block_equals_the_whole_forward(arch: str) -> None:
    model = tiny_model(arch, seed=2)
    windows = [torch.randint(3, 200, (9,)), torch.randint(3, 200, (5,))]
    inputs = M.block_inputs(model, windows)
    assert len(inputs) == 2
    _, blocks = M.decoder_blocks(model)
    with torch.no_grad():
        for inp, w in zip(inputs, windows, strict=True):
            h = inp.hidden
            for blk in blocks:
                h = M.run_block(blk, M.BlockInput(h, inp.kwargs))
            ref = model(w[None], output_hidden_states=True).hidden_states[-1]  # after the final norm
            final_norm = model.model.norm if arch == "llama" else model.transformer.ln_f
            h = final_norm(h)
            torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
