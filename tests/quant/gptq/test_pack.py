"""The standard GPTQ layout: bit-exact packing against AutoGPTQ's own loops, the v1 zero offset, g_idx."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcourse.quant.gptq.gptq import GPTQ
from llmcourse.quant.gptq.pack import dequantize_layer, pack, pack_layer, unpack, unpack_layer


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (qweight: along rows), transcribed as it is written."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    packed = pack(values, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    np.testing.assert_array_equal(packed.numpy(), autogptq_pack_rows(values.numpy(), bits))
    assert torch.equal(unpack(packed, bits, dim=0), values)
    # along the second dimension (qzeros), the same stream
    assert torch.equal(pack(values.t(), bits, dim=1), packed.t())
    assert torch.equal(unpack(packed.t(), bits, dim=1), values.t())


def test_extreme_values_round_trip():
    for bits in (2, 3, 4, 8):
        for v in (0, 2**bits - 1):
            values = torch.full((32, 32), v, dtype=torch.int32)
            assert torch.equal(unpack(pack(values, bits), bits), values)


def test_v1_zero_offset_and_layer_round_trip():
    """Symmetric 4-bit: zero 8 is stored as 7 in every nibble (0x77777777); de-quantization adds 1 back."""
    O, I, G = 64, 96, 3
    codes = torch.randint(0, 16, (O, I), dtype=torch.int32)
    scales = torch.rand(O, G) + 0.1
    zeros = torch.full((O, G), 8.0)
    g_idx = torch.arange(I, dtype=torch.int32) // 32
    t = pack_layer(codes, scales, zeros, g_idx, 4)
    assert t["qweight"].shape == (I // 8, O) and t["qzeros"].shape == (G, O // 8) and t["scales"].shape == (G, O)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    assert (t["qzeros"] == 0x77777777).all()
    c2, z2, s2 = unpack_layer(t, 4)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros.int()) and torch.equal(s2, scales.half().float())
    expected = scales.half().float()[:, g_idx.long()] * (codes - 8).float()
    torch.testing.assert_close(dequantize_layer(t, 4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_asymmetric_zeros_round_trip(bits):
    O, G = 32, 2
    zeros = torch.randint(1, 2**bits, (O, G)).float()  # v1 stores zero - 1 in [0, maxq)
    t = pack_layer(torch.zeros(O, 64, dtype=torch.int32), torch.ones(O, G), zeros,
                   torch.arange(64, dtype=torch.int32) // 32, bits)
    assert torch.equal(unpack_layer(t, bits)[1], zeros.int())


def _hessian(columns: int, seed: int = 0) -> GPTQ:
    g = torch.Generator().manual_seed(seed)
    h = GPTQ(columns)
    scale = torch.rand(columns, generator=g) * 3 + 0.1  # columns of different activity
    h.add_batch(torch.randn(256, columns, generator=g) * scale)
    return h


def test_g_idx_under_act_order():
    """desc_act: groups are formed in quantization order, so g_idx is not monotonic but each group
    has exactly group_size columns; static groups keep g_idx = column // group_size."""
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    h = _hessian(64)
    plain = h.quantize(W, bits=4, group_size=16)
    assert torch.equal(plain.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    act = h.quantize(W, bits=4, group_size=16, desc_act=True)
    perm = torch.argsort(torch.diag(h.H), descending=True)
    assert torch.equal(act.g_idx[perm], torch.arange(64, dtype=torch.int32) // 16)
    assert not torch.equal(act.g_idx, plain.g_idx)
    assert torch.bincount(act.g_idx.long()).tolist() == [16] * 4
    static = h.quantize(W, bits=4, group_size=16, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    for ql in (plain, act, static):  # what is packed is what GPTQ computed
        t = pack_layer(ql.codes, ql.scales, ql.zeros, ql.g_idx, 4)
        torch.testing.assert_close(dequantize_layer(t, 4), ql.scales.half().float()[:, ql.g_idx.long()]
                                   * (ql.codes - ql.zeros[:, ql.g_idx.long()]).float())
