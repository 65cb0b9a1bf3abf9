"""Pruning: Wanda and SparseGPT against faithful re-derivations of their reference code, exact sparsity,
the model-level pass and the ``prune`` command's output and errors.

The two references below are written from reading the original repositories (not imported: neither is a
package): locuslab/wanda ``lib/layerwrapper.py`` (``WrappedGPT.add_batch``: ``scaler_row``) and
``lib/prune.py`` (``prune_wanda``), and IST-DASLab/sparsegpt ``sparsegpt.py`` (``SparseGPT.add_batch`` and
``fasterprune``), with the CUDA/device lines and prints left out.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmcourse.compress import FeatureNorms, PruneConfig, parse_nm, prune_model, sparsegpt, wanda_mask
from llmcourse.core.errors import UserError
from llmcourse.quant.gptq import GPTQ
from tests.conftest import tiny_model

# ---------------------------------------------------------------- the references


def ref_wanda_scaler_row(batches: list[torch.Tensor], columns: int) -> torch.Tensor:
    """locuslab/wanda WrappedGPT.add_batch: scaler_row over batches (1, T, columns)."""
    scaler_row = torch.zeros(columns)
    nsamples = 0
    for inp in batches:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        scaler_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = inp.type(torch.float32)
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    return scaler_row


def ref_wanda_mask(W: torch.Tensor, scaler_row: torch.Tensor, sparsity_ratio: float, prune_n: int = 0,
                   prune_m: int = 0) -> torch.Tensor:
    """locuslab/wanda prune_wanda's mask (without the 'variant')."""
    W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


def ref_hessian(batches: list[torch.Tensor], columns: int) -> torch.Tensor:
    """IST-DASLab/sparsegpt SparseGPT.add_batch (nsamples counts batch rows, as there)."""
    H = torch.zeros((columns, columns))
    nsamples = 0
    for inp in batches:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.float()
        H += inp.matmul(inp.t())
    return H


def ref_fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                    blocksize: int = 128, percdamp: float = .01,
                    quantizer: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """IST-DASLab/sparsegpt SparseGPT.fasterprune; returns (new weight, pruned mask)."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = None
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if quantizer is not None:
                scale, zero, maxq = quantizer
                q = scale * (torch.clamp(torch.round(q.unsqueeze(1) / scale) + zero, 0, maxq) - zero)
                q = q.flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask


# ---------------------------------------------------------------- fixtures


def layer_data(rows: int = 48, columns: int = 160, tokens: int = 400, seed: int = 0):
    """A random weight and correlated inputs (some features much larger, as in LLMs), in 4 batches."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    mix = torch.randn(columns, columns, generator=g) / math.sqrt(columns)
    scale = torch.exp(torch.randn(columns, generator=g))
    X = (torch.randn(tokens, columns, generator=g) @ (torch.eye(columns) + mix)) * scale
    return W, [X[i::4].unsqueeze(0) for i in range(4)]


# ---------------------------------------------------------------- Wanda


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_mask_equals_reference(nm, sparsity):
    W, batches = layer_data()
    norms = FeatureNorms(W.shape[1])
    for b in batches:
        norms.add_batch(b.reshape(-1, W.shape[1]))
    cfg = PruneConfig("wanda", sparsity=sparsity, nm=nm)
    ours = wanda_mask(W, norms.sq_norms, cfg)
    ref = ref_wanda_mask(W, ref_wanda_scaler_row(batches, W.shape[1]), sparsity, *(nm or (0, 0)))
    assert torch.equal(ours, ref)
    if nm:  # every group of M loses exactly N
        assert torch.all(ours.reshape(W.shape[0], -1, nm[1]).sum(-1) == nm[0])
    else:  # every row loses exactly int(sparsity * columns)
        assert torch.all(ours.sum(1) == int(sparsity * W.shape[1]))


def test_wanda_uses_the_input_norms_not_only_magnitudes():
    W, batches = layer_data(seed=1)
    norms = FeatureNorms(W.shape[1])
    for b in batches:
        norms.add_batch(b.reshape(-1, W.shape[1]))
    cfg = PruneConfig("wanda", sparsity=0.5)
    assert not torch.equal(wanda_mask(W, norms.sq_norms, cfg), wanda_mask(W, torch.ones(W.shape[1]), cfg))


# ---------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("nm,blocksize", [(None, 128), (None, 32), ((2, 4), 128), ((4, 8), 64), ((1, 4), 16)])
def test_sparsegpt_equals_fasterprune(nm, blocksize):
    W, batches = layer_data(columns=200)  # 200 = one full block of 128 and a shorter one
    H = GPTQ(W.shape[1])
    for b in batches:
        H.add_batch(b.reshape(-1, W.shape[1]))
    Href = ref_hessian(batches, W.shape[1])
    # the reference divides by batch rows, we by tokens: the same H up to that constant
    torch.testing.assert_close(H.H * (H.nsamples / len(batches)), Href, rtol=1e-4, atol=1e-3)
    cfg = PruneConfig("sparsegpt", sparsity=0.5, nm=nm, block_size=blocksize, scope="block")
    res = sparsegpt(W, Href, cfg)
    W_ref, mask_ref = ref_fasterprune(W, Href, 0.5, *(nm or (0, 0)), blocksize=blocksize)
    assert torch.equal(res.mask, mask_ref)
    assert float((res.weight - W_ref).abs().max()) <= 1e-5 * max(1.0, float(W_ref.abs().max()))
    assert torch.all(res.weight[res.mask] == 0)
    if nm:
        assert torch.all(res.mask.reshape(W.shape[0], -1, nm[1]).sum(-1) == nm[0])


def test_sparsegpt_joint_quantization_equals_fasterprune_with_a_quantizer():
    from llmcourse.quant.gptq import find_params

    W, batches = layer_data(columns=128)
    H = ref_hessian(batches, W.shape[1])
    scale, zero = find_params(W, 4, sym=False)
    grid = (scale, zero, 15)
    res = sparsegpt(W, H, PruneConfig("sparsegpt", nm=(2, 4), bits=4), grid)
    W_ref, mask_ref = ref_fasterprune(W, H, 0.5, 2, 4, quantizer=grid)
    assert torch.equal(res.mask, mask_ref)
    assert float((res.weight - W_ref).abs().max()) <= 1e-5 * max(1.0, float(W_ref.abs().max()))
    codes = torch.round(res.weight / scale + zero)  # every kept weight lies on the 4-bit grid
    torch.testing.assert_close(scale * (codes - zero), res.weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.25])
def test_sparsegpt_row_scope_is_exact_per_row_and_better_than_wanda(sparsity):
    W, batches = layer_data(columns=200)
    H = ref_hessian(batches, W.shape[1])
    res = sparsegpt(W, H, PruneConfig("sparsegpt", sparsity=sparsity))
    assert torch.all(res.mask.sum(1) == int(sparsity * W.shape[1]))
    assert torch.all(res.weight[res.mask] == 0)
    norms = torch.diag(H)  # ∝ ||X_j||²
    wanda = W.masked_fill(wanda_mask(W, norms, PruneConfig("wanda", sparsity=sparsity)), 0)

    def err(Wp: torch.Tensor) -> float:
        d = Wp - W
        return float(((d @ H) * d).sum())

    assert err(res.weight) < err(wanda)


# ---------------------------------------------------------------- the whole model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prune_model_every_layer_exact(method, arch):
    model = tiny_model(arch, seed=3)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = prune_model(model, windows, PruneConfig(method, sparsity=0.5))
    assert rep["layers"] and abs(rep["sparsity"] - 0.5) < 1e-9
    assert all(r["min_row_sparsity"] == r["max_row_sparsity"] == 0.5 for r in rep["layers"])
    assert len(rep["blocks"]) == 2
    rep = prune_model(tiny_model(arch, seed=3), windows, PruneConfig(method, nm=(2, 4)))
    assert all(r["sparsity"] == 0.5 for r in rep["layers"])


def test_prune_model_sees_the_pruned_blocks():
    """Block 1's statistics come from inputs that passed the already pruned block 0."""
    from llmcourse.core.modules import block_inputs, decoder_blocks, run_block

    model = tiny_model("llama", seed=4)
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = tiny_model("llama", seed=4)
    prune_model(model, windows, PruneConfig("wanda", sparsity=0.5))
    # redo by hand: prune block 0 as prune_model did, then derive block 1's mask from its pruned outputs
    _, blocks_ref = decoder_blocks(ref)
    _, blocks = decoder_blocks(model)
    blocks_ref[0].load_state_dict(blocks[0].state_dict())
    inputs = block_inputs(ref, windows)
    xs = []
    for inp in inputs:
        h = run_block(blocks_ref[0], inp)
        with torch.no_grad():
            xs.append(blocks_ref[1].input_layernorm(h).reshape(-1, 64))
    norms = FeatureNorms(64)
    for x in xs:
        norms.add_batch(x)
    W = blocks_ref[1].self_attn.q_proj.weight.detach()
    expect = wanda_mask(W, norms.sq_norms, PruneConfig("wanda", sparsity=0.5))
    assert torch.equal(blocks[1].self_attn.q_proj.weight == 0, expect)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(UserError, match="--sparsity"):
        PruneConfig("wanda", sparsity=bad)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_nm(text):
    with pytest.raises(UserError, match="--nm"):
        parse_nm(text)


def test_true_sequential_and_joint_quantization_on_a_model():
    model = tiny_model("llama", seed=3)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = prune_model(model, windows, PruneConfig("sparsegpt", nm=(2, 4), bits=4, true_sequential=True))
    assert all(r["sparsity"] == 0.5 for r in rep["layers"]) and len(rep["layers"]) == 14
    W = model.model.layers[1].mlp.down_proj.weight.detach()
    assert all(len(torch.unique(row[row != 0])) <= 15 for row in W)  # the kept weights: at most 15 grid points
    with pytest.raises(UserError, match="--bits"):
        PruneConfig("wanda", bits=4)
