"""GPTQ's 4-bit layers through the GGUF block kernels (Q4_0 / Q4_1 blocks, act-order by sorting the inputs).

Tolerances. The blocks hold the checkpoint's weights exactly for symmetric GPTQ (Q4_0, ``d`` = the fp16 scale)
and up to ``m = fp16(-s z)`` for asymmetric (Q4_1: ``|Δw| <= 2⁻¹¹ |s z|``). The products differ from
de-quantize-then-multiply by the 8-bit rounding of the activations (per 32 values, ``d_a = fp16(max|x| / 127)``),
which the tight check reproduces exactly (``q8``): then only fp32 summation order is left,
``|y - ref| <= 2e-6 · (|a| @ |W|ᵀ) + 1e-6`` (the GGUF kernels' own bound, tests/quant/gguf). Against the
weight-only path (fp32 activations) the difference is bounded by the activations' rounding:
``|Δy_o| <= Σ_b (max_b|x| / 127) Σ_{i∈b} |w_oi|`` (twice the half-step, which covers the fp16 rounding of ``d_a``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import compiled_greedy_and_reference
from gptq_helpers import quantized_tiny, random_layer

from llmcourse.core import runtime as fl
from llmcourse.core.runtime.weights import BlockCodes, project
from llmcourse.quant.gptq.blocks import Q4_0, Q4_1, head_choice, kernel_choice, to_blocks
from llmcourse.quant.gptq.linear import GPTQLinear
from llmcourse.quant.gptq.pack import dequantize_layer

kernels = pytest.importorskip("llmcourse.core.runtime.kernels")
if not kernels.load():
    pytest.skip("the block kernels could not be built (no C++ compiler)", allow_module_level=True)


def q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations the kernel multiplies by (llama.cpp's Q8_0 rounding of 32-value blocks), and per block
    what Q4_1's minimum meets: ``fp16(max|x| / 127 · Σ q)``."""
    n, i = x.shape
    xb = x.view(n, i // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax != 0, 127 / amax, torch.zeros_like(amax)))
    sums = ((amax / 127) * q.sum(-1, keepdim=True)).half().float().view(n, -1)
    return (q * (amax / 127).half().float()).view(n, i), sums


def rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_b (max_b|x| / 127) Σ_{i∈b} |w_oi|`` (N, O): what the 8-bit activations may move each output."""
    n, i = x.shape
    step = x.view(n, i // 32, 32).abs().amax(-1) / 127  # (N, nb)
    return step.double() @ w.abs().view(w.shape[0], i // 32, 32).sum(-1).double().T


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_blocks_hold_the_checkpoint_weights(sym, act_order):
    """Symmetric layers become Q4_0 blocks with the checkpoint's weights bit for bit; asymmetric ones Q4_1,
    within the fp16 rounding of ``m = -s z``. Act-order: the same weight with its columns sorted by group."""
    lin = random_layer(40, 576, 128, sym, act_order)  # 576 = 4 x 128 + 64: a ragged last group
    codes, scales, zeros, g_idx = lin.parts()
    blocks, qtype, perm = to_blocks(codes, scales, zeros, g_idx)
    assert qtype == (Q4_0 if sym else Q4_1) and blocks.shape == (40, 18 * 18 if sym else 18 * 20)
    assert (perm is not None) == act_order
    want = dequantize_layer(dict(lin.named_buffers()), 4)  # the checkpoint formula
    if perm is not None:
        want = want[:, perm]
    got = kernels.block_rows(blocks, torch.arange(40), qtype, 576)
    if sym:
        assert torch.equal(got, want)
    else:
        s_z = (scales * zeros.float())[:, g_idx.long() if perm is None else g_idx.long()[perm]]
        assert bool(((got - want).abs() <= s_z.abs() * 2**-11 + 1e-12).all())


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_block_product_equals_the_packed_product(sym, act_order, monkeypatch):
    """The layer's block product (few rows) against its weight-only product (``LLMCOURSE_GPTQ_KERNEL=packed``):
    tight with the activations' rounding reproduced, within the rounding bound without it; the portable
    kernels give the same to the tight bound."""
    lin = random_layer(48, 320, 64, sym, act_order, seed=1)
    x = torch.randn(5, 320, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("LLMCOURSE_GPTQ_KERNEL", "packed")
    kernel_choice.cache_clear()  # read once per process
    with torch.no_grad():
        plain = lin(x)
    w = lin.dequantize()
    monkeypatch.setenv("LLMCOURSE_GPTQ_KERNEL", "blocks")
    kernel_choice.cache_clear()
    bw = lin.decode_weight()
    assert isinstance(bw, BlockCodes) and (bw.perm is not None) == act_order
    with torch.no_grad():
        y = lin(x)
    assert torch.equal(y, project(bw, x))  # the eager forward is the compiled step's product
    xp = x if bw.perm is None else x[:, bw.perm]
    stored, qtype = kernels.deinterleave(bw.blocks, bw.qtype, 320)  # as ggml stores them
    assert bw.qtype == qtype + kernels.X8  # 48 rows: repacked for the 8-row kernels
    wb = kernels.block_rows(bw.blocks, torch.arange(48), bw.qtype, 320)  # the blocks' weight (sorted columns)
    a, sums = q8(xp)
    if qtype == Q4_1:
        m = torch.from_numpy(stored.view(48, 10, 20)[..., 2:4].contiguous().numpy().view("float16")[..., 0]).float()
        ref = a.double() @ (wb - m.repeat_interleave(32, 1)).double().T + sums.double() @ m.double().T
    else:
        ref = a.double() @ wb.double().T
    ref = ref + lin.bias.double()
    tight = 2e-6 * (a.abs().double() @ wb.abs().double().T) + 1e-6
    assert bool(((y.double() - ref).abs() <= tight).all())
    loose = rounding_bound(x, w) + 2**-11 * (x.abs().double() @ w.abs().double().T) + 1e-5
    assert bool(((y.double() - plain.double()).abs() <= loose).all())
    portable = project(dataclasses.replace(bw, level=0), x)
    assert bool(((portable.double() - y.double()).abs() <= 2 * tight).all())


def test_layouts_the_blocks_cannot_hold_keep_the_packed_path():
    """A group size that is not a multiple of 32 (runs of 32 inputs across two groups) or 3 bits: no blocks."""
    assert random_layer(16, 96, 48, True, False).decode_weight().__class__.__name__ == "PackedCodes"
    assert not isinstance(random_layer(32, 96, 32, True, False, bits=3).decode_weight(), BlockCodes)


@pytest.fixture(scope="module")
def act_order_model():
    """A tiny Llama quantized by GPTQ at 4 bits, g32, act-order: every layer runs as blocks."""
    return quantized_tiny(11, bits=4, group_size=32, desc_act=True)


@pytest.mark.skipif(not fl.can_compile(), reason="no C++ compiler for TorchInductor")
def test_compiled_block_step_greedy_equals_weight_only(act_order_model, monkeypatch):
    """The compiled step with the block kernels (8-bit activations) picks the tokens of transformers' loop over
    the weight-only layers (fp32 activations) for 32 greedy tokens on this model."""
    layers = [x for x in act_order_model.modules() if isinstance(x, GPTQLinear)]
    assert all(isinstance(x.decode_weight(), BlockCodes) and x.decode_weight().perm is not None for x in layers)
    ours, ref = compiled_greedy_and_reference(act_order_model, [5, 17, 33, 9], monkeypatch, "LLMCOURSE_GPTQ_KERNEL",
                                              "packed", "blocks", kernel_choice)
    assert ours == ref


def test_q8_0_head_is_ggml_q8_0_of_the_fp16_table(monkeypatch):
    """The default head (``LLMCOURSE_GPTQ_HEAD=q8_0``): the tied fp16 table re-quantized to Q8_0 blocks, byte
    for byte what the gguf package's (llama.cpp's) quantizer writes; lookups keep the fp16 table."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from llmcourse.core.runtime.kernels import q8_0_quantize
    from llmcourse.quant.gptq.linear import HalfHead, HalfTable

    table = (torch.randn(300, 64, generator=torch.Generator().manual_seed(0)) * 0.05).half()
    ref = gguf.quantize(table.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0_quantize(table).numpy(), ref.reshape(300, -1))
    head = HalfHead(HalfTable(table))
    monkeypatch.setenv("LLMCOURSE_GPTQ_HEAD", "fp16")
    head_choice.cache_clear()  # read once per process
    assert isinstance(head.decode_weight(), fl.Dense)  # the fp16 table itself
    monkeypatch.delenv("LLMCOURSE_GPTQ_HEAD")
    head_choice.cache_clear()
    bw = head.decode_weight()
    assert isinstance(bw, BlockCodes) and bw.qtype == 8  # Q8_0 (300 rows: not regrouped by 8, stored order)
    assert torch.equal(bw.blocks, q8_0_quantize(table))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, exact = head(x), x @ table.float().T
    assert torch.equal(y, project(bw, x))
    w_q = kernels.block_rows(bw.blocks, torch.arange(300), bw.qtype, 64)
    bound = rounding_bound(x, w_q) + x.abs().double() @ (w_q - table.float()).abs().double().T + 1e-5
    assert bool(((y.double() - exact.double()).abs() <= bound).all())


@pytest.mark.parametrize(("choice", "var", "other", "default"), [(kernel_choice, "LLMCOURSE_GPTQ_KERNEL", "packed", "blocks"),
                                                                 (head_choice, "LLMCOURSE_GPTQ_HEAD", "fp16", "q8_0")])
def test_switches_are_read_once(choice, var, other, default, monkeypatch, caplog):
    monkeypatch.setenv(var, other)
    assert choice() == other
    monkeypatch.setenv(var, default)
    assert choice() == other  # read once per process
    choice.cache_clear()
    monkeypatch.setenv(var, "nonsense")
    with caplog.at_level("WARNING"):
        assert choice() == choice() == default
    assert caplog.text.count(f"{var}=nonsense is not") == 1
