"""GGUF kernels: our numpy quantizers against ggml's C reference, byte for byte.

The reference is ``ggml_quantize_chunk`` / ``to_float`` from llama-cpp-python's libggml-base.so
(through ctypes, ``ggml.py``). Everything is compared exactly: quantized bytes with ``==``,
de-quantized floats bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from llmcourse.core.errors import UserError
from llmcourse.quant.gguf import imatrix as im
from llmcourse.quant.gguf.blocks import LAYOUTS
from llmcourse.quant.gguf.quantize import QUANT_TYPES, dequantize, quantize


@pytest.fixture(scope="module")
def ggml():
    """ggml's C reference (``ggml_ref.py``); the tests that need it skip without llama-cpp-python."""
    pytest.importorskip("llama_cpp", reason="the C reference is libggml-base.so from llama-cpp-python")
    import ggml_ref

    if ggml_ref.lib_path() is None:  # pragma: no cover
        pytest.skip("libggml-base.so not found in the llama_cpp package")
    return ggml_ref


def _ids(ts):
    return [t.name for t in ts]


def _tensors(n: int = 512, rows: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of several distributions, plus rows built to hit the edge cases."""
    rng = np.random.default_rng(seed)
    f = np.float32
    special = rng.standard_normal((rows, n)).astype(f)
    special[0] = 0  # all-zero blocks
    special[1] = 0.375  # constant positive blocks
    special[2] = -2.5  # constant negative blocks
    special[3, :32] = 0
    special[3, 40] = 1e4  # a huge outlier
    special[4] = np.tile(np.array([1, -1], f), n // 2)  # +a and -a: the first one wins
    special[5] *= 1e-30  # tiny values (fp16 scales underflow)
    special[6] = np.round(special[6] * 4) / 4  # values on a grid (ties in rounding)
    special[7, ::2] = 0  # sparse
    special[8] = np.abs(special[8])  # all positive
    special[9] = -np.abs(special[9])  # all negative
    special[10, :256] = 1e-3
    special[10, 7] = 1
    special[11, :] = np.linspace(-1, 1, n, dtype=f)
    return {
        "normal": rng.standard_normal((rows, n)).astype(f),
        "uniform": rng.uniform(-1, 1, (rows, n)).astype(f),
        "heavy": rng.standard_t(2, (rows, n)).astype(f),
        "special": special,
    }


def _imatrices(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.random(n) ** 4).astype(np.float32)
    w0 = w.copy()
    w0[: n // 4] = 0  # columns never activated
    return {"random": w, "zeros": w0}


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, what
    bad = np.nonzero((ours != ref).any(axis=-1).reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} rows differ, first {bad[:5].tolist()}"


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=_ids(QUANT_TYPES))
def test_layout_matches_ggml(qtype, ggml):
    lay = LAYOUTS[qtype]
    assert (lay.block_size, lay.type_size) == GGML_QUANT_SIZES[qtype]
    assert lay.row_bytes(1536) == ggml.lib().ggml_row_size(int(qtype), 1536)
    assert lay.bits_per_weight == 8 * lay.type_size / lay.block_size


# ----------------------------------------------------------------------------- bit-exact

@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=_ids(QUANT_TYPES))
def test_bit_exact_without_imatrix(qtype, ggml):
    for name, x in _tensors().items():
        assert_same_bytes(quantize(x, qtype), ggml.quantize(x, qtype), f"{qtype.name} {name}")


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=_ids(QUANT_TYPES))
def test_bit_exact_with_imatrix(qtype, ggml):
    n = 512
    for wname, w in _imatrices(n).items():
        for name, x in _tensors(n, seed=2).items():
            assert_same_bytes(quantize(x, qtype, w), ggml.quantize(x, qtype, w),
                              f"{qtype.name} {name} imatrix={wname}")


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=_ids(QUANT_TYPES))
def test_dequantize_matches_ggml(qtype, ggml):
    x = np.concatenate(list(_tensors(seed=3).values()))
    raw = ggml.quantize(x, qtype)
    ours, ref = dequantize(raw, qtype), ggml.dequantize(raw, qtype, x.shape[1])
    assert ours.dtype == np.float32 and ours.shape == x.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_shapes_rows_and_round_trip_error(qtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    keep = x.copy()
    q = quantize(x, qtype)
    assert q.shape == (2, 3, LAYOUTS[qtype].row_bytes(512))
    assert np.array_equal(x, keep)  # the input is not modified
    assert np.array_equal(quantize(x[1, 2], qtype), q[1, 2])  # rows are independent
    err = np.abs(dequantize(q, qtype) - x).max()
    bits = {T.Q4_0: 4, T.Q8_0: 8, T.Q4_K: 4, T.Q6_K: 6}[qtype]
    assert err < 4 * np.abs(x).max() / 2 ** bits


def test_imatrix_changes_the_result_where_it_should():
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    w = np.ones(256, np.float32)
    assert np.array_equal(quantize(x, T.Q8_0, w), quantize(x, T.Q8_0))  # Q8_0 ignores it
    assert not np.array_equal(quantize(x, T.Q4_K, w), quantize(x, T.Q4_K))  # another search


def test_bad_input_raises_user_error():
    x = np.zeros((2, 576), np.float32)
    with pytest.raises(UserError, match="multiple of Q4_K's block of 256"):
        quantize(x, T.Q4_K)
    with pytest.raises(UserError, match="multiple of Q4_0's block of 32"):
        quantize(np.zeros((2, 40), np.float32), T.Q4_0)
    with pytest.raises(UserError, match="importance matrix has 3 values"):
        quantize(x, T.Q4_0, np.ones(3, np.float32))
    with pytest.raises(UserError, match="not supported"):
        quantize(x, T.IQ2_XXS)
    with pytest.raises(UserError, match="not whole Q4_0 blocks"):
        dequantize(np.zeros((2, 17), np.uint8), T.Q4_0)


def test_torch_threads_restored():
    before = torch.get_num_threads()
    quantize(np.ones((2, 64), np.float32), T.Q4_0)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- importance matrix

@pytest.fixture
def tiny_llama():
    from conftest import tiny_model

    return tiny_model("llama")


def test_imatrix_collect_and_files(tiny_llama, tmp_path, ggml):
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    mat = im.collect(tiny_llama, ids, dataset="random ids")
    assert mat.chunk_count == 3 and mat.chunk_size == 24 and mat.datasets == ["random ids"]
    assert sorted(mat.entries)[:2] == ["blk.0.attn_k.weight", "blk.0.attn_output.weight"]
    assert len(mat.entries) == 2 * 7  # q k v o gate up down per layer; no output (tied, no --process-output)

    # the statistic is sum over tokens of x^2 of the layer's input, here the first attention norm
    seen = []
    h = tiny_llama.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for w in ids:
            tiny_llama(input_ids=w[None])
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    e = mat.entries["blk.0.attn_q.weight"]
    assert e.counts.tolist() == [72]
    np.testing.assert_allclose(e.in_sum2[0], (x * x).sum(0).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(mat.entries["blk.0.attn_k.weight"].in_sum2, e.in_sum2)  # same input

    # GGUF file: our reader and ggml's own gguf parser (as llama-quantize normalises it) agree
    p = tmp_path / "imatrix.gguf"
    im.save(mat, p)
    back = im.load(p)
    ref = ggml.read_imatrix_gguf(str(p))
    assert sorted(ref) == sorted(mat.entries) == sorted(back.entries)
    for name in ref:
        assert np.array_equal(back.weights(name), ref[name])
        assert np.array_equal(mat.weights(name), ref[name])
    assert (back.chunk_count, back.chunk_size, back.datasets) == (3, 24, ["random ids"])

    # legacy .dat: values survive up to float32 rounding of (sum / count * ncall) / ncall
    d = tmp_path / "imatrix.dat"
    im.save(mat, d, legacy=True)
    old = im.load(d)
    for name in mat.entries:
        np.testing.assert_allclose(old.weights(name), mat.weights(name), rtol=1e-6)
    assert old.chunk_count == 3 and old.datasets == ["random ids"]

    # used by the quantizers exactly as ggml uses it
    w = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().numpy()  # (64, 128): rows of 128
    qw = back.weights("blk.0.ffn_down.weight")
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        assert_same_bytes(quantize(w, qtype, qw), ggml.quantize(w, qtype, qw), qtype.name)


def test_imatrix_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        im.load(tmp_path / "missing.gguf")
    p = tmp_path / "junk.dat"
    p.write_bytes(b"\x05\x00\x00\x00junk")
    with pytest.raises(UserError, match="not a readable imatrix"):
        im.load(p)


# ----------------------------------------------------------------------------- the default model

def _model_rows(w: np.ndarray, block: int) -> np.ndarray:
    """ggml rows of a (out, in) weight; 576-wide rows are joined into rows of 2304 for the
    256-wide k-quants (llama.cpp itself falls back to a legacy type there)."""
    if w.shape[-1] % block == 0:
        return w
    n = int(np.lcm(w.shape[-1], block))
    return w.reshape(-1, n) if w.size % n == 0 else w


@pytest.mark.slow
def test_bit_exact_on_default_model_tensors(default_lm, ggml):
    sd = default_lm.model.state_dict()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.7.mlp.down_proj.weight", "model.layers.29.mlp.up_proj.weight",
             "model.layers.3.input_layernorm.weight"]
    tensors = {n: sd[n].detach().float().numpy() for n in names}
    tensors["model.embed_tokens.weight[:1024]"] = sd["model.embed_tokens.weight"][:1024].float().numpy()
    rng = np.random.default_rng(6)
    for name, w in tensors.items():
        for qtype in QUANT_TYPES:
            rows = _model_rows(w.reshape(-1, w.shape[-1]), LAYOUTS[qtype].block_size)
            if rows.shape[-1] % LAYOUTS[qtype].block_size:
                continue
            # an imatrix that looks like real activations: positive, a few large columns
            qw = (rng.gamma(0.5, 1.0, rows.shape[-1]) ** 2).astype(np.float32)
            for imat in (None, qw):
                assert_same_bytes(quantize(rows, qtype, imat), ggml.quantize(rows, qtype, imat),
                                  f"{name} {qtype.name} imatrix={imat is not None}")
