"""The model runtime's compiled decode step on tiny random models: logits against transformers, beams, int8,
fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llmcourse.core import runtime as rt
from llmcourse.core.runtime import model as rt_model
from llmcourse.core.runtime import weights as rt_weights
from llmcourse.core.runtime.compile import COMPILE_OPTIONS
from llmcourse.decoding import GenerationConfig, generate

FastModel = rt.FastModel
pytestmark = pytest.mark.skipif(not rt.can_compile(), reason="no C++ compiler for TorchInductor")


def _stepped_logits(fast: FastModel, ids: torch.Tensor, first: int = 2) -> torch.Tensor:
    """Prefill ``first`` tokens, then one step per token: logits at every position from first-1 on (B, T', V)."""
    t = ids.shape[1]
    session = fast.session(ids.shape[0], t)
    got = [session.prefill(ids[:, :first])]
    for i in range(first, t):
        got.append(session.step(ids[:, i]))
    fast.last_session = session  # for the capacity check
    return torch.stack(got, dim=1)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases, untied head
    ("llama", {"vocab_size": 250, "intermediate_size": 120}),  # outputs not a multiple of the tile
])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_step_logits_match_transformers(arch: str, overrides: dict, rows: int) -> None:
    model = tiny_model(arch, seed=3, **overrides)
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, model.config.vocab_size, (rows, 9), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits.float()[:, 1:]
    fast = FastModel(model, matvec="compiled")
    assert fast.matvec == "compiled"
    with torch.inference_mode():
        got = _stepped_logits(fast, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    cap = fast.last_session.capacity
    assert cap % rt.CAPACITY_STEP == 0 and cap >= 9


def test_step_in_runs_of_layers_equals_the_whole_stack() -> None:
    """``layers_per_call`` splits the compiled step into runs of layers (then the head, its own call): the same logits
    as the one-call stack and as transformers."""
    model = tiny_model("llama", seed=4, num_hidden_layers=3)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()[:, 1:]
    whole = FastModel(model, matvec="compiled", layers_per_call=0)  # 0: all layers (a float model's default is 1)
    runs = FastModel(model, matvec="compiled", layers_per_call=2)
    assert (whole.layers_per_call, runs.layers_per_call) == (3, 2)
    with torch.inference_mode():
        a, b = _stepped_logits(whole, ids), _stepped_logits(runs, ids)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_greedy_and_beam_identical(arch: str, monkeypatch) -> None:
    monkeypatch.setenv("LLMCOURSE_COMPILE", "1")  # tiny models would run uncompiled under "auto"
    model = tiny_model(arch, seed=5)
    prompt = [5, 17, 33, 9]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, 4:].tolist()
        beam = model.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=4, num_return_sequences=2,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = generate(model, None, prompt, GenerationConfig(max_new_tokens=64))
    assert out.backend == "fast" and out.sequences[0].token_ids == ref
    assert (1, 128) in rt.held_runtime(model, "compiled")._warm  # the compiled step ran (1 row, 68 -> 128)
    bout = generate(model, None, prompt, GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=12,
                                                          num_return_sequences=2))
    assert (4, 64) in rt.held_runtime(model, "compiled")._warm  # 4 beams through the tiled products
    for i in range(2):
        n = int((beam.beam_indices[i] != -1).sum())
        assert bout.sequences[i].token_ids == beam.sequences[i, 4:4 + n].tolist()
        assert abs(bout.sequences[i].score - float(beam.sequences_scores[i])) <= 1e-4


def test_auto_compiles_only_big_models(monkeypatch) -> None:
    monkeypatch.delenv("LLMCOURSE_COMPILE", raising=False)
    model = tiny_model("llama")
    assert rt.auto_matvec(model) == "mm"  # a few hundred KB: compiling would cost more than it saves
    monkeypatch.setattr(rt_model, "AUTO_MIN_BYTES", 1)
    assert rt.auto_matvec(model) == "compiled"
    monkeypatch.setenv("LLMCOURSE_COMPILE", "0")
    rt.KernelOptions.detect.cache_clear()  # the override is read once per process
    assert rt.auto_matvec(model) == "mm"


@pytest.mark.parametrize("words", [False, True])
def test_int8_linears_plug_into_the_compiled_step(words, monkeypatch) -> None:
    """One-byte codes read as bytes (AVX-512 CPUs) or as 4-byte words (others, :func:`byte_dot`)."""
    from llmcourse.quant.int8 import Int8Config, quantize_model

    monkeypatch.setenv("LLMCOURSE_INT8_KERNEL", "rows")  # the weight-only RowCodes (not the W8A8 block kernel)
    kernels = rt.KernelOptions(byte_words=words)

    model = tiny_model("llama", seed=6)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    for method in ("absmax", "zeropoint"):
        q = tiny_model("llama", seed=6)
        quantize_model(q, Int8Config(method=method, granularity="row"))
        assert rt.compilable(q, kernels)
        compiled, eager = FastModel(q, "compiled", kernels), FastModel(q, "mm", kernels)
        assert compiled.step_layers[0].o.byte_words == words
        assert compiled.matvec == "compiled"
        with torch.inference_mode():
            a, b = _stepped_logits(compiled, ids), _stepped_logits(eager, ids)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # group-wise statistics have no compiled form: the runtime runs them on the eager path
    g = tiny_model("llama", seed=6)
    quantize_model(g, Int8Config(method="absmax", granularity="group", group_size=32))
    assert not rt.compilable(g) and FastModel(g, matvec="compiled").matvec == "mm"
    del model


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_byte_dot_reads_one_byte_codes_as_words(dtype) -> None:
    """byte_dot (the int8 step on CPUs without AVX-512) equals x Qᵀ, eager and compiled, one row and a
    tiled batch; project() takes it, with the zero point and 1/scale, wherever it is switched on."""
    g = torch.Generator().manual_seed(3)
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    codes = torch.randint(lo, hi, (32, 24), generator=g).to(dtype)
    inv, zero = torch.rand(32, 1, generator=g) * 0.1, torch.randn(32, 1, generator=g)
    dot = torch.compile(rt_weights.byte_dot, options=COMPILE_OPTIONS)
    for b in (1, 3):
        x = torch.randn(b, 24, generator=g)
        ref = x @ codes.float().t()
        torch.testing.assert_close(rt_weights.byte_dot(codes, x), ref, rtol=1e-5, atol=1e-3)  # |ref| up to ~900
        torch.testing.assert_close(dot(codes, x), ref, rtol=1e-5, atol=1e-3)
        want = (x @ (codes.float() - zero).t()) * inv.view(1, -1)
        for words in (False, True):
            torch.testing.assert_close(rt.project(rt.RowCodes(codes, inv, zero, None, words), x), want,
                                       rtol=1e-5, atol=1e-4)

    class Plugin(torch.nn.Module):
        def __init__(self, c: torch.Tensor) -> None:
            super().__init__()
            self.c = c

        def decode_weight(self) -> rt.RowCodes:
            return rt.RowCodes(self.c, inv, zero)

    on = rt.KernelOptions(byte_words=True)
    assert rt_weights.step_weight(Plugin(codes), on).byte_words
    assert not rt_weights.step_weight(Plugin(codes[:, :22].contiguous()), on).byte_words  # not whole words


def test_failed_compilation_falls_back_to_eager(monkeypatch, caplog) -> None:
    model = tiny_model("llama", seed=7)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()[:, 1:]

    def broken(fn):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(rt_model, "compile_fn", broken)
    fast = FastModel(model, matvec="compiled")
    with torch.inference_mode():
        got = _stepped_logits(fast, ids)
    assert fast.matvec == "eager" and "torch.compile failed" in caplog.text
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_warmup_leaves_the_cache_alone() -> None:
    model = tiny_model("llama", seed=8)
    fast = FastModel(model, matvec="compiled")
    ids = torch.tensor([[4, 5, 6]])
    with torch.inference_mode():
        session = fast.session(1, 10)
        first = session.prefill(ids)
        fast.warmup(4, 100)  # another shape, compiled on scratch caches
        assert session.pos == 3 and session.capacity == rt.CAPACITY_STEP and session.k_cache[0].shape[0] == 1
        nxt = session.step(first.argmax(-1))
    with torch.no_grad():
        ref = model(torch.cat([ids, first.argmax(-1)[:, None]], dim=1)).logits[:, -1]
    torch.testing.assert_close(nxt, ref, rtol=0, atol=1e-4)


def test_short_generations_skip_compiling_until_a_compiled_step_is_warm(monkeypatch) -> None:
    from llmcourse.decoding import engine

    monkeypatch.setattr(rt_model, "AUTO_MIN_BYTES", 1)  # treat the tiny model as big
    model = tiny_model("llama", seed=9)
    prompt = [3, 4, 5]
    short = engine.make_decoder(model, steps=engine.COMPILE_MIN_STEPS - 1)
    assert short.fast.matvec == "mm"
    out_long = generate(model, None, prompt, GenerationConfig(max_new_tokens=engine.COMPILE_MIN_STEPS))
    assert rt.held_runtime(model, "compiled")._warm  # the long run compiled its step
    assert engine.make_decoder(model, steps=2).fast.matvec == "compiled"  # now reused, even for short runs
    out_short = generate(model, None, prompt, GenerationConfig(max_new_tokens=8))
    assert out_short.sequences[0].token_ids == out_long.sequences[0].token_ids[:8]


def test_compiled_multi_token_step_matches_eager(arch: str = "llama") -> None:
    """Verifying T tokens in one compiled call (padded to a width bucket) gives the eager forward's logits at
    every position and leaves the session where the eager one does; near the cache's end it runs eagerly."""
    model = tiny_model(arch, seed=10)
    fast, eager = FastModel(model, matvec="compiled"), FastModel(model, matvec="mm")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 256, (1, 7), generator=gen)
    with torch.inference_mode():
        s, e = fast.session(1, 20), eager.session(1, 20)
        s.prefill(prompt), e.prefill(prompt)
        for t in (3, 4):  # width 4: padded, then exact
            ids = torch.randint(3, 256, (1, t), generator=gen)
            a, b = s.forward(ids, all_logits=True), e.forward(ids, all_logits=True)
            assert a.shape == (1, t, model.config.vocab_size) and s.pos == e.pos
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
            s.rollback(s.pos - 1), e.rollback(e.pos - 1)  # drop the last token, as a rejected draft
        nxt = torch.tensor([9])
        torch.testing.assert_close(s.step(nxt), e.step(nxt), rtol=0, atol=1e-4)  # the pads were overwritten
        assert (1, 64, 4) in fast._warm
        long = torch.randint(3, 256, (1, 60), generator=gen)
        s, e = fast.session(1, 63), eager.session(1, 63)
        s.prefill(long), e.prefill(long)
        ids = torch.tensor([[4, 5, 6]])  # 60 + 4 positions would overrun the 64-position cache: run eagerly
        torch.testing.assert_close(s.forward(ids, all_logits=True), e.forward(ids, all_logits=True), rtol=0, atol=1e-4)
        assert s.pos == 63 and len(fast._warm) == 2


def test_step_layers_override_is_read_once(monkeypatch, caplog) -> None:
    monkeypatch.setenv("LLMCOURSE_STEP_LAYERS", "3")
    assert rt_model.default_layers_per_call(True) == rt_model.default_layers_per_call(False) == 3
    monkeypatch.setenv("LLMCOURSE_STEP_LAYERS", "5")
    assert rt_model.default_layers_per_call(True) == 3  # read once per process
    rt_model.forced_layers_per_call.cache_clear()
    monkeypatch.setenv("LLMCOURSE_STEP_LAYERS", "all")
    with caplog.at_level("WARNING"):
        assert (rt_model.default_layers_per_call(True), rt_model.default_layers_per_call(False)) == (0, 1)
    assert caplog.text.count("LLMCOURSE_STEP_LAYERS=all is not") == 1
