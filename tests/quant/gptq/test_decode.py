"""GPTQLinear in the decoding lab's compiled step: equal groups from ragged ones, same greedy tokens as eager."""

from __future__ import annotations

import pytest
import torch
from gptq_helpers import quantized_tiny, random_layer

from llmcourse.core import runtime as fl
from llmcourse.core.runtime import model as rt_model
from llmcourse.core.runtime import pack_words, packed_dot, unpack_words
from llmcourse.core.runtime.weights import BlockCodes
from llmcourse.decoding import GenerationConfig, generate
from llmcourse.quant.gptq.blocks import kernel_choice
from llmcourse.quant.gptq.linear import GPTQLinear
from llmcourse.quant.gptq.pack import dequantize_layer
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama at 4 bits, g48: its 64- and 128-wide layers end in a shorter group (ragged)."""
    return quantized_tiny(7, bits=4, group_size=48, act_group_aware=True)


def test_decode_weights_are_the_same_weight_in_equal_groups(quantized):
    layers = [x for x in quantized.modules() if isinstance(x, GPTQLinear)]
    assert {x.equal_groups() for x in layers} == {16}  # gcd(48, 64) = gcd(48, 128) = 16
    for x in layers:
        before = x.dequantize()
        packed = x.decode_weight()
        assert isinstance(packed, fl.PackedCodes) and packed.bits == 4
        words, scale, zero, bias = packed.words, packed.scale, packed.zero, packed.bias
        o, i = x.out_features, x.in_features
        # 4-bit codes packed 8 to a 32-bit word (float32 bits), one read of the packed weight per token
        assert words.dtype == torch.float32 and words.shape == (o, i // 8)
        assert scale.shape == zero.shape == (o, i // 16) and bias is None
        codes = unpack_words(words, i, i // 16)
        w = ((codes.float().view(o, -1, 16) - zero[..., None]) * scale[..., None]).view(o, i)
        assert torch.equal(w, before)
        assert torch.equal(x.dequantize(), before)  # now from the words, in one compiled pass
        assert x._codes is None  # the words replaced the one-byte codes
    # act-order: a permuted g_idx has no equal runs, so the packed words' layer offers nothing (the step calls
    # forward()); the block kernels take it with the inputs sorted by group (test_blocks.py)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCOURSE_GPTQ_KERNEL", "packed")
        kernel_choice.cache_clear()  # read once per process
        assert random_layer(32, 64, 32, True, True).decode_weight() is None
    kernel_choice.cache_clear()
    assert isinstance(random_layer(32, 64, 32, True, True).decode_weight(), BlockCodes)


@pytest.mark.parametrize("order", ["natural", "act-order"])
def test_dequantize_equals_the_checkpoint_formula(order):
    """The in-place equal-group path (natural g_idx, ragged last group) and the gather path (act-order) give
    the packed tensors' own ``scales[g] (q - zero[g])`` bit for bit."""
    layer = random_layer(24, 80, 32, False, order == "act-order", seed=3)  # groups of 32, 32, 16
    assert (layer.equal_group_parts() is None) == (order == "act-order")
    assert torch.equal(layer.dequantize(), dequantize_layer(dict(layer.named_buffers()), 4))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_words_round_trip_and_product(bits):
    """pack_words / unpack_words are exact inverses; packed_dot (eager and compiled, one row and a tiled
    batch, with and without zero points) is x Wᵀ of the de-quantized weight."""
    gen = torch.Generator().manual_seed(bits)
    o, i, groups = 32, 96, 3
    codes = torch.randint(0, 2 ** bits, (o, i), generator=gen)
    words = pack_words(codes, groups, bits)
    assert words.dtype == torch.float32 and words.shape == (o, i * bits // 32)
    assert torch.equal(unpack_words(words, i, groups), codes.int())
    scale = torch.rand(o, groups, generator=gen) + 0.01
    zero = torch.randint(0, 2 ** bits, (o, groups), generator=gen).float()
    w = ((codes.float().view(o, groups, -1) - zero[..., None]) * scale[..., None]).view(o, i)
    assert torch.equal(fl.WordsDequantizer()(words, bits, scale, zero), w)
    fns = [packed_dot] + ([torch.compile(packed_dot, dynamic=False)] if fl.can_compile() else [])
    for fn in fns:
        for rows in (1, 5):
            x = torch.randn(rows, i, generator=gen)
            no_zero = (codes.float().view(o, groups, -1) * scale[..., None]).view(o, i)
            for z, ref in ((zero, x @ w.t()), (None, x @ no_zero.t())):
                # fp32 sums in another order: equal within a few ulps of the largest output
                assert (fn(words, scale, z, x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(not fl.can_compile(), reason="no C++ compiler for TorchInductor")
def test_compiled_greedy_equals_eager(quantized, monkeypatch):
    monkeypatch.setenv("LLMCOURSE_COMPILE", "1")  # tiny models would run uncompiled under "auto"
    assert fl.compilable(quantized)
    prompt = [5, 17, 33, 9]
    with torch.no_grad():  # transformers' loop over GPTQLinear.forward (de-quantized weight, F.linear)
        ref = quantized.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, 4:].tolist()
    out = generate(quantized, None, prompt, GenerationConfig(max_new_tokens=64, eos_token_ids=()))
    assert out.backend == "fast" and fl.held_runtime(quantized, "compiled").warm  # the compiled step ran
    assert out.sequences[0].token_ids == ref


def test_half_table_is_the_fp16_checkpoint_table_for_lookup_and_tied_head(monkeypatch):
    """A tied fp16 embedding stays fp16: lookups and the head give what an fp32 copy of it gives (the head in
    fp16, ``LLMCOURSE_GPTQ_HEAD=fp16``; its default Q8_0 blocks: test_blocks.py)."""
    monkeypatch.setenv("LLMCOURSE_GPTQ_HEAD", "fp16")
    from llmcourse.core.runtime.weights import step_weight
    from llmcourse.quant.gptq.linear import HEAD_SLICE, HalfHead, HalfTable

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(HEAD_SLICE + 100, 32, generator=gen).half()  # two slices, the last ragged
    emb = HalfTable(table)
    head = HalfHead(emb)
    ids = torch.tensor([[0, 5, HEAD_SLICE + 99]])
    assert emb(ids).dtype == torch.float32 and torch.equal(emb(ids), table.float()[ids])
    x = torch.randn(3, 32, generator=gen)
    assert torch.allclose(head(x), x @ table.float().t(), rtol=1e-5, atol=1e-5)
    assert step_weight(head, fl.KernelOptions.detect()).weight is table  # the compiled step reads the fp16 tensor itself
    assert dict(emb.named_buffers()).keys() == {"table"} and not list(head.buffers())


@pytest.mark.skipif(not fl.can_compile(), reason="no C++ compiler for TorchInductor")
def test_short_prompt_runs_as_compiled_steps(quantized, monkeypatch):
    """A model with packed codes prefills a prompt of up to STEP_PROMPT tokens as one-token compiled steps
    (no de-quantized weights): the same logits as the eager prefill, within float rounding."""
    fast = fl.FastModel(quantized, matvec="compiled")
    assert fast.step_prompt == rt_model.STEP_PROMPT > 0
    ids = torch.tensor([[5, 17, 33, 9]])
    by_steps = fast.session(1, 64).prefill(ids)
    fast.step_prompt = 0  # the eager prompt path (de-quantized weights, F.linear)
    eager = fast.session(1, 64).prefill(ids)
    assert torch.allclose(by_steps, eager, atol=1e-4, rtol=1e-4)
    assert fl.FastModel(tiny_model("llama", seed=7), matvec="compiled").step_prompt == 0  # fp32: eager prompt
