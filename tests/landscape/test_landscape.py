"""Loss-landscape lab on tiny random models: directions, exact sweeps, restore, resume, interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcourse.core.modules import linear_weight
from llmcourse.landscape.directions import direction_to, perturbed_parameters, random_direction
from llmcourse.landscape.surface import (
    Perturbation,
    PointBatch,
    WindowLoss,
    batched_loss,
    loss_on,
    sweep,
    sweep_grid,
    sweep_line,
)
from tests.conftest import tiny_model


def _ids(n: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _identical(model, snap) -> bool:
    return all(torch.equal(p.detach(), snap[n]) and p.detach().view(torch.int32).equal(snap[n].view(torch.int32))
               for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_filter_rows_have_weight_row_norms(arch):
    model = tiny_model(arch)
    d = random_direction(model, seed=1, norm="filter", ignore="biasbn")
    for name, m in model.named_modules():
        if type(m).__name__ in ("Linear", "Conv1D") and f"{name}.weight" in d:  # a tied head is listed once
            w, dw = linear_weight(m), d[f"{name}.weight"]
            dv = dw if isinstance(m, torch.nn.Linear) else dw.t()
            torch.testing.assert_close(dv.norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=0)


def test_layer_norm_and_ignored_and_seeded():
    model = tiny_model("llama")
    d = random_direction(model, seed=3, norm="layer", ignore="biasbn")
    params = perturbed_parameters(model)
    for n, p in params.items():
        if p.dim() <= 1:
            assert not d[n].any(), n
        else:
            torch.testing.assert_close(d[n].norm(), p.detach().norm(), rtol=1e-5, atol=0)
    again = random_direction(model, seed=3, norm="layer")
    assert all(torch.equal(d[n], again[n]) for n in d)
    other = random_direction(model, seed=4, norm="layer")
    assert not torch.equal(d["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
    kept = random_direction(model, seed=3, norm="none", ignore="none")
    assert all(kept[n].any() for n in kept)


def test_tied_weights_perturbed_once():
    model = tiny_model("llama")  # tie_word_embeddings=True
    d = random_direction(model, seed=0)
    assert "lm_head.weight" not in d and "model.embed_tokens.weight" in d
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_centre_equals_base_and_weights_bit_identical():
    model = tiny_model("llama")
    ids = _ids()
    base = batched_loss(model, ids)
    snap = _snapshot(model)
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    xs = np.linspace(-1, 1, 5)
    z, secs = sweep_grid(model, loss_on(ids), d1, d2, xs, xs)
    assert z[2, 2] == base
    assert np.all(np.isfinite(z)) and z.max() > base and secs.shape == (5, 5)
    assert _identical(model, snap)
    assert batched_loss(model, ids) == base


def test_no_drift_points_independent_of_order():
    model = tiny_model("llama")
    ids = _ids()
    d = random_direction(model, 1)
    xs = np.array([0.5, -0.3, 0.5, 0.0, 0.5])
    z, _ = sweep_line(model, loss_on(ids), d, xs)
    assert z[0] == z[2] == z[4]
    assert z[3] == batched_loss(model, ids)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_weights_restored_after_error(exc):
    model = tiny_model("qwen2")
    ids = _ids()
    snap = _snapshot(model)
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 4:
            raise exc("stop")
        return batched_loss(m, ids)

    with pytest.raises(exc):
        sweep_grid(model, failing, d1, d2, np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
    assert _identical(model, snap)


def test_resumed_grid_equals_uninterrupted(tmp_path):
    model = tiny_model("llama")
    ids = _ids()
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    xs = np.linspace(-1, 1, 4)
    full, _ = sweep_grid(model, loss_on(ids), d1, d2, xs, xs)
    state = tmp_path / "partial.npz"
    calls = []

    def interrupted(m):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return batched_loss(m, ids)

    with pytest.raises(KeyboardInterrupt):
        sweep_grid(model, interrupted, d1, d2, xs, xs, state=state, key="k")
    with np.load(state) as z:
        assert int(np.isfinite(z["losses"]).sum()) == 6
    counted = []

    def counting(m):
        counted.append(1)
        return batched_loss(m, ids)

    resumed, _ = sweep_grid(model, counting, d1, d2, xs, xs, state=state, key="k")
    assert len(counted) == 16 - 6
    np.testing.assert_array_equal(resumed, full)
    # another key: starts afresh
    counted.clear()
    sweep_grid(model, counting, d1, d2, xs, xs, state=state, key="other")
    assert len(counted) == 16


def test_interpolation_endpoints_and_plane_of_three_models():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = _ids()
    la, lb, lc = (batched_loss(m, ids) for m in (a, b, c))
    d = direction_to(a, b)
    z, _ = sweep_line(a, loss_on(ids), d, np.array([0.0, 0.5, 1.0]))
    assert z[0] == la
    assert z[2] == pytest.approx(lb, abs=1e-5)
    z2, _ = sweep(a, loss_on(ids), [direction_to(a, b), direction_to(a, c)], np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert z2[0] == pytest.approx(lb, abs=1e-5) and z2[1] == pytest.approx(lc, abs=1e-5)


def test_direction_to_rejects_other_shapes():
    from llmcourse.core.errors import UserError

    with pytest.raises(UserError, match="shape"):
        direction_to(tiny_model("llama"), tiny_model("llama", intermediate_size=96))
    with pytest.raises(UserError, match="different parameters"):
        direction_to(tiny_model("llama"), tiny_model("qwen2"))


def test_plane_points_independent_of_history():
    model = tiny_model("llama")
    ids = _ids()
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    pts = np.array([[0.5, 0.5], [0.2, -0.5], [0.0, 0.0], [0.5, 0.5], [0.0, 0.5]])
    z, _ = sweep(model, loss_on(ids), [d1, d2], pts)
    assert z[0] == z[3] and z[2] == batched_loss(model, ids)
    z_alone, _ = sweep(model, loss_on(ids), [d1, d2], pts[4:])
    assert z_alone[0] == z[4]


def test_kept_rows_and_summed_rows_give_the_same_bits():
    model = tiny_model("llama")
    ids = _ids()
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    pts = [(0.5, 0.25), (-0.3, 0.25), (0.0, 0.25), (0.7, -0.5), (0.0, 0.0)]
    out = {}
    for keep in (True, False):
        with Perturbation(model, [d1, d2], keep_rows=keep) as p:
            out[keep] = []
            for c in pts:
                p.set(c)
                out[keep].append(batched_loss(model, ids))
    assert out[True] == out[False]
    assert out[True][4] == batched_loss(model, ids)


class _Outside(torch.nn.Module):
    """Uses its inner layer's weight outside that layer's forward (no hook sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.inner.weight)


def test_parameter_used_outside_its_module_is_set_eagerly():
    model = _Outside()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    snap = _snapshot(model)

    def loss(m):
        with torch.no_grad():
            return float(m(x).sum())

    z, _ = sweep_line(model, loss, d, np.array([1.0, 0.0, 2.0]))
    w = snap["inner.weight"]
    assert z[0] == pytest.approx(float(torch.nn.functional.linear(x, w + 1).sum()), rel=1e-6)
    assert z[1] == loss(model) and z[2] == pytest.approx(float(torch.nn.functional.linear(x, w + 2).sum()), rel=1e-6)
    assert _identical(model, snap)


@pytest.mark.parametrize("arch,norm,ignore", [("llama", "filter", "biasbn"), ("qwen2", "layer", "none"),
                                              ("gpt2", "filter", "none")])
def test_batched_grid_equals_per_point_grid(arch, norm, ignore):
    """A grid row per forward (PointBatch) gives the bits of one point per forward (Perturbation): the same
    adds in the same order, each point's matmuls on its own rows; the centre is the base loss."""
    model = tiny_model(arch)
    ids = _ids()
    snap = _snapshot(model)
    d1, d2 = random_direction(model, 1, norm, ignore), random_direction(model, 2, norm, ignore)
    xs = np.linspace(-1, 1, 5)
    batched, _ = sweep_grid(model, loss_on(ids), d1, d2, xs, xs)
    single, _ = sweep_grid(model, loss_on(ids), d1, d2, xs, xs, batch=1)
    np.testing.assert_array_equal(batched, single)
    assert batched[2, 2] == batched_loss(model, ids)
    assert _identical(model, snap)


def test_point_batch_in_small_chunks_matches_points():
    """Weights walked in chunks of a few output rows (as the default model's layers are): each chunk's
    matmul reduces over the same inputs, so the losses agree to float rounding (here: exactly or 1e-6)."""
    model = tiny_model("llama")
    ids = _ids()
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    pts = [(-0.5, 0.25), (0.0, 0.25), (0.7, 0.25)]
    loss = loss_on(ids)
    with Perturbation(model, [d1, d2]) as p:
        single = []
        for c in pts:
            p.set(c)
            single.append(loss(model))
    with PointBatch(model, [d1, d2], chunk_bytes=5 * 64 * 4) as p:  # 5 rows of a 64-wide layer per chunk
        p.set_points(pts, rows=len(ids))
        batched = loss.points(model, len(pts))
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=0)


def test_batched_sweep_resumes_by_whole_rows(tmp_path):
    model = tiny_model("llama")
    ids = _ids()
    snap = _snapshot(model)
    d1, d2 = random_direction(model, 1), random_direction(model, 2)
    xs = np.linspace(-1, 1, 4)
    full, _ = sweep_grid(model, loss_on(ids), d1, d2, xs, xs)
    state = tmp_path / "partial.npz"

    class Interrupted(WindowLoss):
        batches = 0

        def points(self, model, k):
            type(self).batches += 1
            if self.batches == 3:
                raise KeyboardInterrupt
            return super().points(model, k)

    with pytest.raises(KeyboardInterrupt):
        sweep_grid(model, Interrupted(ids), d1, d2, xs, xs, state=state, key="k", save_every=0.0)
    assert _identical(model, snap)
    with np.load(state) as z:
        assert int(np.isfinite(z["losses"]).sum()) == 8  # two whole rows of 4
    resumed, _ = sweep_grid(model, loss_on(ids), d1, d2, xs, xs, state=state, key="k")
    np.testing.assert_array_equal(resumed, full)


class _HeadOutside(torch.nn.Module):
    """A causal LM whose head weight is used outside the head's forward (no PointBatch forward sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)
        self.head = torch.nn.Linear(8, 256, bias=False)

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.nn.functional.linear(self.embed(input_ids), self.head.weight))


def test_batched_sweep_falls_back_to_points_for_parameters_used_outside():
    torch.manual_seed(0)
    model = _HeadOutside()
    ids = _ids()
    d = random_direction(model, 1)
    xs = np.array([-1.0, 0.5, 1.0])
    batched, _ = sweep_line(model, loss_on(ids), d, xs)
    single, _ = sweep_line(model, loss_on(ids), d, xs, batch=1)
    np.testing.assert_array_equal(batched, single)
