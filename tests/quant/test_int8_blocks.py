"""The 8-bit lab's absmax int8 weights through the Q8_0 block kernel (W8A8): exactness and decoding.

Tolerances. The repacked blocks hold the codes themselves with ``d = 1`` (exact), and the row scale ``1/s``
multiplies in fp32 afterwards, so the product differs from the weight-only ``x (q / s)ᵀ`` only by the 8-bit
rounding of the activations per 32 values (``d_a = fp16(max|x| / 127)``). With that rounding reproduced
(``q8``) only fp32 summation order is left: ``|y - ref| <= 2e-6 · (|a| @ |W|ᵀ) + 1e-6`` (the GGUF kernels'
bound, tests/quant/gguf). Without it, each output moves by at most ``Σ_b (max_b|x| / 127) Σ_{i∈b} |w_oi|``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import compiled_greedy_and_reference, tiny_model

from llmcourse.core import runtime as fl
from llmcourse.core.runtime.kernels import q8_0_blocks
from llmcourse.core.runtime.weights import BlockCodes, project
from llmcourse.quant.int8 import Int8Config, quantize_model, quantize_tensor
from llmcourse.quant.int8.linear import Int8Linear, kernel_choice

kernels = pytest.importorskip("llmcourse.core.runtime.kernels")
if not kernels.load():
    pytest.skip("the block kernels could not be built (no C++ compiler)", allow_module_level=True)


def q8(x: torch.Tensor) -> torch.Tensor:
    """The activations the Q8_0 kernel multiplies by (llama.cpp's rounding of 32-value blocks)."""
    n, i = x.shape
    xb = x.view(n, i // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax != 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127).half().float()).view(n, i)


def test_q8_0_blocks_are_the_codes_with_unit_scales():
    codes = torch.randint(-128, 128, (7, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    blocks = q8_0_blocks(codes)
    assert blocks.shape == (7, 3 * 34) and blocks.dtype == torch.uint8
    assert torch.equal(kernels.block_rows(blocks, torch.arange(7), 8, 96), codes.float())


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_w8a8_product_equals_weight_only_up_to_the_activations_rounding(granularity, monkeypatch):
    torch.manual_seed(3)
    lin = torch.nn.Linear(576, 72)
    mod = Int8Linear(quantize_tensor(lin.weight, "absmax", granularity), lin.bias.detach())
    x = torch.randn(5, 576) * 2
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "rows")
    kernel_choice.cache_clear()  # read once per process
    assert isinstance(mod.decode_weight(), fl.RowCodes)
    with torch.no_grad():
        plain = mod(x)
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "blocks")
    kernel_choice.cache_clear()
    bw = mod.decode_weight()
    assert isinstance(bw, BlockCodes) and bw.scale.shape == (72,)
    with torch.no_grad():
        y = mod(x)
    assert torch.equal(y, project(bw, x))  # the eager forward is the compiled step's product
    w = mod.dequantize()
    a = q8(x)
    ref = (a.double() @ mod.qweight.double().T) * mod.inv_scale.double().T + lin.bias.double()
    tight = 2e-6 * (a.abs().double() @ w.abs().double().T) + 1e-6
    assert bool(((y.double() - ref).abs() <= tight).all())
    step = x.view(5, 18, 32).abs().amax(-1) / 127
    loose = step.double() @ w.abs().view(72, 18, 32).sum(-1).double().T + 1e-5
    assert bool(((y.double() - plain.double()).abs() <= loose).all())
    portable = project(dataclasses.replace(bw, level=0), x)
    assert bool(((portable.double() - y.double()).abs() <= 2 * tight).all())
    with torch.no_grad():  # many rows (a long prompt) keep the de-quantized GEMM
        many = torch.randn(70, 576)
        torch.testing.assert_close(mod(many), torch.nn.functional.linear(many, w, lin.bias), rtol=1e-5, atol=1e-5)


def test_zero_point_group_and_odd_widths_keep_the_weight_only_paths():
    torch.manual_seed(0)
    for qt in (quantize_tensor(torch.randn(8, 64), "zeropoint", "row"),
               quantize_tensor(torch.randn(8, 40), "absmax", "row")):
        assert isinstance(Int8Linear(qt).decode_weight(), fl.RowCodes)
    assert Int8Linear(quantize_tensor(torch.randn(8, 64), "absmax", "group", 32)).decode_weight() is None


@pytest.mark.skipif(not fl.can_compile(), reason="no C++ compiler for TorchInductor")
def test_compiled_w8a8_greedy_equals_weight_only(monkeypatch):
    """The compiled step through the Q8_0 kernel picks transformers' greedy tokens over the weight-only int8
    layers (fp32 activations) on a tiny Llama (its tied head included), 32 tokens."""
    model = tiny_model("llama", seed=5)
    quantize_model(model, Int8Config("absmax", "row"))
    ours, ref = compiled_greedy_and_reference(model, [5, 17, 33, 9], monkeypatch, "LLMCOURSE_INT8_KERNEL", "rows",
                                              "blocks", kernel_choice)
    assert all(isinstance(m.decode_weight(), BlockCodes) for m in model.modules() if isinstance(m, Int8Linear))
    assert ours == ref


def test_kernel_switch_is_read_once(monkeypatch, caplog):
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "rows")
    assert kernel_choice() == "rows"
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "blocks")
    assert kernel_choice() == "rows"  # read once per process
    kernel_choice.cache_clear()
    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "row")
    with caplog.at_level("WARNING"):
        assert kernel_choice() == kernel_choice() == "blocks"
    assert caplog.text.count("LLMCOURSE_INT8_KERNEL=row is not") == 1
