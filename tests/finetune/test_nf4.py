"""NF4 (QLoRA): the code book against the paper's table, round trips, double quantization, the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcourse.finetune.nf4 import (
    BLOCK,
    NF4_CODE,
    NF4Linear,
    dequantize_absmax,
    dequantize_nf4,
    nf4_code_book,
    quantize_absmax,
    quantize_nf4,
)


def test_code_book_matches_the_paper():
    # the quantile construction reproduces the table of the QLoRA paper (appendix E) to float precision
    torch.testing.assert_close(nf4_code_book(), NF4_CODE, atol=1e-6, rtol=0)
    assert NF4_CODE.numel() == 16 and (NF4_CODE == 0).sum() == 1 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7  # asymmetric, with an exact zero


def test_round_trip_against_the_code_book():
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    t = quantize_nf4(w, double_quant=False)
    back = dequantize_nf4(t)
    blocks, bblocks = w.reshape(-1, BLOCK), back.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    normed = blocks / absmax
    nearest = NF4_CODE[(normed[..., None] - NF4_CODE).abs().argmin(-1)]  # brute-force nearest code value
    torch.testing.assert_close(bblocks, nearest * absmax, atol=0, rtol=0)
    # the largest weight of each block is stored exactly (code +-1)
    torch.testing.assert_close(bblocks.abs().amax(1), absmax[:, 0], atol=0, rtol=0)
    # idempotent: re-quantizing the de-quantized weight changes nothing
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(back, double_quant=False)), back, atol=0, rtol=0)
    assert t.codes.dtype == torch.uint8 and t.codes.numel() == w.numel() // 2


def test_double_quantization_of_the_scales():
    torch.manual_seed(1)
    w = torch.randn(576, 1536) * 0.02
    t = quantize_nf4(w)
    assert t.absmax_q.dtype == torch.float8_e4m3fn and t.dq_scale.numel() == -(-w.numel() // BLOCK // 256)
    bits = 8 * t.nbytes / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01  # 4.127 bits per weight
    c = w.reshape(-1, BLOCK).abs().amax(1)
    c2 = dequantize_absmax(*quantize_absmax(c))
    assert ((c2 - c).abs() / c).max() < 0.07  # fp8 e4m3: 3 mantissa bits on c - mean
    err = (dequantize_nf4(t) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    assert err < 0.12  # NF4 relative RMS error of Gaussian weights is about 0.1


def test_against_bitsandbytes_nf4():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.02
    try:
        q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ref = bnb_f.dequantize_4bit(q, state, quant_type="nf4")
    except Exception as e:  # its CPU 4-bit path needs a kernels package fetched from a hub
        pytest.skip(f"bitsandbytes 4-bit does not run here ({type(e).__name__})")
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(w, double_quant=False)), ref.float(), atol=1e-6, rtol=0)


def test_nf4_linear_forward_backward_and_memory():
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    q = NF4Linear(lin)
    w = q.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ w.t() + lin.bias
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    fp32 = sum(p.numel() * 4 for p in lin.parameters())
    nf4 = sum(b.numel() * b.element_size() for b in q.buffers()) + q.bias.numel() * 4
    assert nf4 < 0.16 * fp32
    assert not any(p.requires_grad for p in q.parameters())
