"""The GGUF block kernels (``core/runtime/kernels``) against de-quantize-then-multiply, every type and
instruction-set level, and GGUF models executed as stored blocks against llama.cpp.

Tolerances. The kernels' only intended difference from ``x @ dequantize(W).T`` is the 8-bit rounding of the
activations (per 32-value block for the legacy types, per 256 for the k-quants). So:

* tight: against ``dequantize(Q8(x)) @ dequantize(W).T`` in float64, ``|y - ref| <= 2e-6 · (|a| @ |W|.T) + 1e-6``
  (fp32 accumulation of exact integer block sums);
* loose: against the fp32 product ``x @ W.T``, relative error of each output vector below 2 %;
* the levels (portable C++, AVX2, AVX-512 VNNI) agree to the same tight bound (their integer sums are
  equal; only the fp32 summation order differs);
* the legacy types' interleaved layout (8 rows repacked together, ``kernels.interleave``) meets the same tight
  bound at every level, and its lookups are the stored layout's, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

kernels = pytest.importorskip("llmcourse.core.runtime.kernels")
if not kernels.load():
    pytest.skip("the block kernels could not be built (no C++ compiler)", allow_module_level=True)

from llmcourse.quant.gguf.quantize import dequantize  # noqa: E402  (after the build check)

LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
KQUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
HALF_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
               QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_blocks(qtype: QT, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random stored rows (rows, row bytes): every code bit pattern, fp16 scales of either sign in [1e-3, 1e-2]."""
    values, nbytes = kernels.BLOCK_TYPES[int(qtype)]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        scale = (rng.uniform(1e-3, 1e-2, raw.shape[:2]) * rng.choice([-1, 1], raw.shape[:2])).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def weight(qtype: QT, blocks: torch.Tensor) -> torch.Tensor:
    """The lab's (ggml-exact) de-quantization of the rows."""
    return torch.from_numpy(np.asarray(dequantize(blocks.numpy(), qtype), dtype=np.float32))


def q8_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels multiply by (llama.cpp's activation blocks, rounded half to even): legacy types (Q8_0)
    ``q = round(x · 127 / max|x|)``, ``d = fp16(max|x| / 127)``; k-quants (Q8_K) with ``m`` the value of largest
    magnitude, ``q = min(127, round(x · (-127 / m)))``, ``d = 1 / (-127 / m)``. Also, per legacy block, what
    Q4_1/Q5_1's minima meet: ``fp16(max|x| / 127 · Σ q)`` (ggml's Q8_1 ``s``)."""
    n, i = x.shape
    xb = x.view(n, i // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    zero = torch.zeros_like(amax)
    if block == 32:
        q = torch.round(xb * torch.where(amax != 0, 127 / amax, zero))
        d = (amax / 127).half().float()
        sums = ((amax / 127) * q.sum(-1, keepdim=True)).half().float().view(n, -1)
    else:
        m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        inv = torch.where(amax != 0, -127 / m, zero)
        q = torch.round(inv * xb).clamp(max=127)
        d = torch.where(amax != 0, 1 / inv, zero)
        sums = None
    return (q * d).view(n, i), sums


def check(qtype: QT, rows: int, cols: int, n: int, seed: int = 0) -> torch.Tensor:
    blocks = random_blocks(qtype, rows, cols, seed)
    w = weight(qtype, blocks)
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(seed))
    block = kernels.BLOCK_TYPES[int(qtype)][0]
    a, sums = q8_activations(x, block)
    if qtype in (QT.Q4_1, QT.Q5_1):  # w = d q + m: the minima meet the fp16 block sums of the activations
        m = torch.from_numpy(blocks.numpy().reshape(rows, cols // 32, -1)[:, :, 2:4].copy().view(np.float16)[..., 0])
        m = m.float()
        w_dq = w - m.repeat_interleave(32, dim=1)
        ref = a.double() @ w_dq.double().T + sums.double() @ m.double().T
    else:
        ref = a.double() @ w.double().T
    bound = 2e-6 * (a.abs().double() @ w.abs().double().T) + 1e-6
    got = {}
    layouts = [(blocks, int(qtype))]
    packed, ptype = kernels.interleave(blocks, int(qtype), cols)
    if qtype in LEGACY and rows % 8 == 0:
        assert ptype == int(qtype) + kernels.X8 and packed.shape == blocks.shape
        layouts.append((packed, ptype))
    for level in range(kernels.cpu_level() + 1):
        for wb, t in layouts:
            y = kernels.block_mm(x, wb, t, rows, level=level)
            assert y.shape == (n, rows) and y.dtype == torch.float32
            err = (y.double() - ref).abs()
            assert bool((err <= bound).all()), f"{qtype.name} ({t}) level {level}: max excess {(err - bound).max():.3g}"
        got[level] = y
    exact = x.double() @ w.double().T
    rel = (got[0].double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(rel.max()) < 0.02, f"{qtype.name}: {float(rel.max()):.4f}"
    return blocks


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
def test_each_type_equals_dequantize_then_multiply(qtype):
    cols = 96 if qtype in LEGACY else 768  # an odd number of blocks
    for rows, n in [(1, 1), (17, 1), (576, 1), (37, 5), (64, 19), (8, 3)]:  # decode, ragged tiles, prompts
        check(qtype, rows, cols, n, seed=rows + n)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_model_shapes(qtype):
    """The default model's row counts: 576, 1536 and the 49152-row head (one block per row: cheap)."""
    cols = kernels.BLOCK_TYPES[int(qtype)][0]
    for rows in (576, 1536, 49152):
        check(qtype, rows, cols, 2, seed=rows)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda t: t.name)
def test_rows_are_the_lab_dequantization(qtype):
    cols = 64 if qtype in LEGACY else 512
    blocks = random_blocks(qtype, 40, cols, seed=3)
    ids = torch.tensor([0, 39, 7, 7, 12])
    got = kernels.block_rows(blocks, ids, int(qtype), cols)
    assert torch.equal(got, weight(qtype, blocks)[ids])
    packed, ptype = kernels.interleave(blocks, int(qtype), cols)
    assert torch.equal(kernels.block_rows(packed, ids, ptype, cols), got)
    assert torch.equal(kernels.deinterleave(packed, ptype, cols)[0], blocks)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_interleaved_layout_is_the_same_bytes_regrouped(qtype):
    """Group g, block k of the interleaved layout holds the 8 rows' scales, then (Q5_*) the fifth bits as bit planes,
    then their codes in 4-byte slices: spot-check against the stored blocks, and the layouts that keep the stored order."""
    cols = 64
    blocks = random_blocks(qtype, 16, cols, seed=4)
    packed, ptype = kernels.interleave(blocks, int(qtype), cols)
    size = kernels.BLOCK_TYPES[int(qtype)][1]
    stored = blocks.view(16, 2, size)
    group = packed.view(2, 2, 8 * size)  # (groups, blocks, bytes)
    for j in range(8):
        assert torch.equal(group[1, 1, 2 * j:2 * j + 2], stored[8 + j, 1, 0:2])  # row 8 + j's d
    codes = group[0, 1, -(256 if qtype == QT.Q8_0 else 128):]
    assert torch.equal(codes[32 + 4 * 3:32 + 4 * 4], stored[3, 1, size - (32 if qtype == QT.Q8_0 else 16) + 4:][:4])
    assert kernels.interleave(blocks[:12], int(qtype), cols)[1] == int(qtype)  # 12 rows: stored order kept
    assert kernels.interleave(random_blocks(QT.Q4_K, 16, 256), int(QT.Q4_K), 256)[1] == int(QT.Q4_K)


def test_zero_rows_and_forced_level_from_the_environment(monkeypatch):
    blocks = random_blocks(QT.Q4_0, 8, 64)
    assert torch.equal(kernels.block_mm(torch.zeros(2, 64), blocks, int(QT.Q4_0), 8), torch.zeros(2, 8))
    x = torch.randn(3, 64)
    monkeypatch.setenv("LLMCOURSE_BLOCK_ISA", "portable")
    kernels.forced_level.cache_clear()
    try:
        assert kernels.forced_level() == 0
        assert torch.equal(kernels.block_mm(x, blocks, int(QT.Q4_0), 8), kernels.block_mm(x, blocks, 2, 8, level=0))
    finally:
        kernels.forced_level.cache_clear()


def test_bad_arguments_are_errors():
    blocks = random_blocks(QT.Q8_0, 4, 64)
    with pytest.raises(RuntimeError):
        kernels.block_mm(torch.randn(1, 64), blocks, int(QT.Q8_0), 5)  # wrong byte count
    with pytest.raises(RuntimeError):
        kernels.block_rows(blocks, torch.tensor([4]), int(QT.Q8_0), 64)  # row out of range


def test_several_weights_in_one_call_equal_separate_calls():
    """``mm_many`` (q/k/v, gate/up: one activation quantization, one parallel pass) gives each weight's own product."""
    cols = 512
    ws = [(QT.Q5_0, 96), (QT.Q6_K, 17), (QT.Q8_0, 40), (QT.Q4_K, 64), (QT.Q4_0, 24)]
    blocks = [random_blocks(t, rows, cols, seed=k) for k, (t, rows) in enumerate(ws)]
    packed = [kernels.interleave(b, int(t), cols) for (t, _), b in zip(ws, blocks, strict=True)]
    x = torch.randn(6, cols)
    for level in range(kernels.cpu_level() + 1):
        for layout in (blocks, [b for b, _ in packed]):
            types = [int(t) for t, _ in ws] if layout is blocks else [t for _, t in packed]
            got = kernels.block_mm_many(x, layout, types, [rows for _, rows in ws], level=level)
            for t, (_, rows), b, y in zip(types, ws, layout, got, strict=True):
                assert torch.equal(y, kernels.block_mm(x, b, t, rows, level=level))


def test_products_equal_llama_cpps_own_kernels():
    """llama.cpp's CPU kernels (libggml-cpu from llama-cpp-python: the type's ``from_float`` for the activations,
    ``vec_dot`` for the product) on the same rows: Q8_0 bit for bit, the others within fp32 summation order."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    import ctypes
    from pathlib import Path

    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    if not (libdir / "libggml-cpu.so").exists():
        pytest.skip("libggml-cpu.so not found in the llama_cpp package")
    ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)

    class Traits(ctypes.Structure):  # ggml-cpu.h: struct ggml_type_traits_cpu
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                    ("nrows", ctypes.c_int64)]

    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    cpu.ggml_cpu_init()
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                               ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    x = np.random.default_rng(1).standard_normal(1536).astype(np.float32)
    for qtype in LEGACY + KQUANTS:
        traits = cpu.ggml_get_type_traits_cpu(int(qtype)).contents
        quant = from_float(cpu.ggml_get_type_traits_cpu(traits.vec_dot_type).contents.from_float)
        dot = vec_dot(traits.vec_dot)
        w = random_blocks(qtype, 32, 1536, seed=5).numpy()
        if qtype == QT.Q8_0:  # llama.cpp's own Q8_0 codes lie in [-127, 127]
            codes = w.reshape(32, -1, 34)[:, :, 2:].view(np.int8)
            codes[codes == -128] = -127
        act = np.zeros(2 * 1536, np.uint8)
        quant(x.ctypes.data, act.ctypes.data, 1536)
        ref = np.zeros(32, np.float32)
        s = ctypes.c_float()
        for r in range(32):
            row = np.ascontiguousarray(w[r])
            dot(1536, ctypes.byref(s), 0, row.ctypes.data, 0, act.ctypes.data, 0, 1)
            ref[r] = s.value
        for level in range(kernels.cpu_level() + 1):
            got = kernels.block_mm(torch.from_numpy(x).view(1, -1), torch.from_numpy(w), int(qtype), 32, level=level)
            err = np.abs(got[0].numpy() - ref).max() / np.abs(ref).max()
            if qtype == QT.Q8_0 and level > 0:
                assert err == 0, f"{qtype.name} level {level}: {err}"
            assert err < 1e-5, f"{qtype.name} level {level}: {err}"
            packed, ptype = kernels.interleave(torch.from_numpy(w), int(qtype), 1536)
            got = kernels.block_mm(torch.from_numpy(x).view(1, -1), packed, ptype, 32, level=level)
            err = np.abs(got[0].numpy() - ref).max() / np.abs(ref).max()
            if qtype == QT.Q8_0 and level > 0:  # the interleaved Q8_0 kernel keeps ggml's lanes and order
                assert err == 0, f"{qtype.name} interleaved, level {level}: {err}"
            assert err < 1e-5, f"{qtype.name} interleaved, level {level}: {err}"


def test_block_linear_runs_long_inputs_as_a_float_gemm():
    """From ``GEMM_ROWS`` rows on (a long prompt), ``BlockLinear`` de-quantizes row chunks and uses the fp32 GEMM:
    the float model's product (no 8-bit activations); fewer rows go through the block kernels."""
    from llmcourse.quant.gguf import execute

    blocks = random_blocks(QT.Q4_K, 4100, 256, seed=9)  # more rows than one de-quantized chunk
    lin = execute.BlockLinear(blocks, int(QT.Q4_K), 256, 4100)
    w = weight(QT.Q4_K, blocks)
    x = torch.randn(execute.GEMM_ROWS, 256)
    torch.testing.assert_close(lin(x), x @ w.T, atol=1e-4, rtol=1e-5)
    assert torch.equal(lin(x[:3]), kernels.block_mm(x[:3], blocks, int(QT.Q4_K), 4100))


def test_per_row_scales_multiply_each_output_in_the_same_call():
    """``scale`` (the int8 lab's per-row 1/s) applied inside the kernel call: exactly ``y * scale``, both layouts."""
    cols = 96
    blocks = random_blocks(QT.Q8_0, 24, cols, seed=6)
    packed, ptype = kernels.interleave(blocks, int(QT.Q8_0), cols)
    scale = torch.rand(24) + 0.5
    x = torch.randn(5, cols)
    for level in range(kernels.cpu_level() + 1):
        for wb, t in ((blocks, int(QT.Q8_0)), (packed, ptype)):
            plain = kernels.block_mm(x, wb, t, 24, level=level)
            scaled = torch.ops.llmcourse_blocks.mm(x, wb, t, 24, level, scale)
            assert torch.equal(scaled, plain * scale)
            (many,) = torch.ops.llmcourse_blocks.mm_many(x, [wb], [t], [24], level, [scale])
            assert torch.equal(many, scaled)
