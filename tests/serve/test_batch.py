"""The batching engine itself (llmcourse.serve.batch.ContinuousBatcher / BatchSession), without HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_helpers import byte_tokenizer, server, tiny_folder, tiny_lm, tiny_model  # noqa: F401  (fixtures)

from llmcourse.core.runtime import FastModel
from llmcourse.decoding import GenerationConfig, generate
from llmcourse.serve.batch import BatchRequest, BatchSession, ContinuousBatcher, QueueFull

PROMPTS = ["hello there", "the cat sat on", "a", "in the beginning was the word and", "xyz", "tttt", "he said",
           "one two three four five six seven eight nine ten eleven twelve"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", vocab_size=263, max_position_embeddings=512), byte_tokenizer()


def run_all(batcher: ContinuousBatcher, reqs: list[tuple[list[int], GenerationConfig, int]],
            gaps: float = 0.0, one_at_a_time: bool = False) -> list[list[list[int]]]:
    """Submit each (prompt, config, n), ``gaps`` seconds apart (or each once the one before ended);
    the generated tokens of each choice."""
    out: list[dict[int, list[int]]] = [{} for _ in reqs]
    ended = threading.Semaphore(0)

    def sink(i: int):
        def on(ev):
            if ev.kind == "done":
                out[i][ev.index] = ev.token_ids
            elif ev.kind in ("end", "error"):
                ended.release()
        return on

    batcher.start()
    try:
        for i, (ids, cfg, n) in enumerate(reqs):
            batcher.submit(BatchRequest(ids, cfg, sink(i), n=n))
            if one_at_a_time:
                assert ended.acquire(timeout=120)
            time.sleep(gaps)
        for _ in reqs if not one_at_a_time else ():
            assert ended.acquire(timeout=120)
    finally:
        batcher.stop(30)
    return [[o[k] for k in sorted(o)] for o in out]


def reference(model, tok, prompt: str, n_new: int) -> list[int]:
    return generate(model, tok, prompt, GenerationConfig(max_new_tokens=n_new, eos_token_ids=())).sequences[0].token_ids


@pytest.mark.parametrize("chunk", [128, 3])
def test_eight_at_once_equal_generate_alone(lm, chunk):
    model, tok = lm
    b = ContinuousBatcher(model, tok, max_batch=8, ctx=128, prefill_chunk=chunk, matvec="mm", eos_token_ids=[])
    got = run_all(b, [(tok(p).input_ids, GenerationConfig(max_new_tokens=16), 1) for p in PROMPTS])
    assert [g[0] for g in got] == [reference(model, tok, p, 16) for p in PROMPTS]


def test_join_and_leave_at_step_boundaries(lm):
    """Different lengths, staggered arrivals, fewer slots than requests: every answer is the lone answer."""
    model, tok = lm
    lengths = [3, 20, 7, 12, 1, 9, 15, 5]
    b = ContinuousBatcher(model, tok, max_batch=3, ctx=128, prefill_chunk=5, matvec="mm", eos_token_ids=[])
    got = run_all(b, [(tok(p).input_ids, GenerationConfig(max_new_tokens=n), 1) for p, n in zip(PROMPTS, lengths, strict=True)],
                  gaps=0.002)
    assert [g[0] for g in got] == [reference(model, tok, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    assert b.free_slots == 3 and b.stats["requests"] == 8


def test_n_choices_share_the_prompt_and_seeded_sampling_repeats(lm):
    model, tok = lm
    ids = tok("the cat").input_ids
    b = ContinuousBatcher(model, tok, max_batch=4, ctx=64, matvec="mm", eos_token_ids=[])
    greedy, s1 = run_all(b, [(ids, GenerationConfig(max_new_tokens=8), 2),
                             (ids, GenerationConfig(strategy="sample", seed=3, max_new_tokens=8), 2)])
    assert greedy == [reference(model, tok, "the cat", 8)] * 2
    b = ContinuousBatcher(model, tok, max_batch=4, ctx=64, matvec="mm", eos_token_ids=[])
    (s2,) = run_all(b, [(ids, GenerationConfig(strategy="sample", seed=3, max_new_tokens=8), 2)])
    assert s1 == s2 and s1[0] != s1[1]


@pytest.mark.slow  # compiling takes 10-40 s on a cold Inductor cache; the default-model tests compile too
def test_compiled_step_equals_eager(lm):
    from llmcourse.core.runtime import can_compile

    if not can_compile():
        pytest.skip("no C++ compiler for torch.compile")
    model, tok = lm
    # the last prompt's answer crosses the attention window's first boundary (64 -> 128 positions)
    reqs = [(tok(p).input_ids, GenerationConfig(max_new_tokens=10), 1) for p in [*PROMPTS[:3], "ab " * 29]]
    eager = run_all(ContinuousBatcher(model, tok, max_batch=2, ctx=128, matvec="mm", eos_token_ids=[]), reqs)
    b = ContinuousBatcher(FastModel(model, matvec="compiled"), tok, max_batch=2, ctx=128, eos_token_ids=[])
    assert b.session.compiled
    assert run_all(b, reqs) == eager


def test_prompt_prefix_reused(lm):
    """A prompt that begins like an earlier one starts past the shared tokens (its slot kept their K/V),
    and answers as it does alone."""
    model, tok = lm
    system = tok("you are a helpful assistant. ").input_ids
    prompts = [system + tok(q).input_ids for q in PROMPTS[:3]]
    b = ContinuousBatcher(model, tok, max_batch=2, ctx=128, matvec="mm", eos_token_ids=[])
    got = run_all(b, [(p, GenerationConfig(max_new_tokens=8), 1) for p in prompts], one_at_a_time=True)
    assert [g[0] for g in got] == [reference(model, tok, p, 8) for p in prompts]
    assert b.stats["cached_prompt_tokens"] == 2 * len(system)


def test_prompts_served_together_share_their_prefix(lm):
    """Requests admitted together (fresh slots, nothing cached yet): each prompt after the first copies the shared
    system prompt's K/V from the slot that computed it, and answers as it does alone."""
    model, tok = lm
    system = tok("you are a helpful assistant. ").input_ids
    prompts = [system + tok(q).input_ids for q in PROMPTS[:3]]
    b = ContinuousBatcher(model, tok, max_batch=3, ctx=128, matvec="mm", eos_token_ids=[])
    got = run_all(b, [(p, GenerationConfig(max_new_tokens=8), 1) for p in prompts])
    assert [g[0] for g in got] == [reference(model, tok, p, 8) for p in prompts]
    assert b.stats["cached_prompt_tokens"] == 2 * len(system)


def test_adopt_prefix_copies_another_slots_cache(lm):
    model, _ = lm
    s = BatchSession(FastModel(model, matvec="mm"), 3, 64)
    a, c = s.acquire(), s.acquire([5, 6, 7, 1])
    assert s.pos[c] == 0
    ref = s.prefill(a, [5, 6, 7, 8])
    assert s.adopt_prefix(c, [5, 6, 7, 1]) == 3 and s.cached[c] == [5, 6, 7]
    for kc in s.k_cache:
        assert torch.equal(kc[c, :, :3], kc[a, :, :3])
    assert torch.allclose(s.prefill(c, [8]), ref, atol=1e-5)  # as if it had run all four tokens itself
    assert s.adopt_prefix(c, [9, 9]) == s.pos[c]  # nothing longer elsewhere: unchanged


def test_acquire_prefers_the_longest_cached_prefix(lm):
    model, _ = lm
    s = BatchSession(FastModel(model, matvec="mm"), 3, 64)
    a, c = s.acquire(), s.acquire()
    s.prefill(a, [5, 6, 7, 8])
    s.prefill(c, [5, 6, 9])
    s.release(a)
    s.release(c)
    assert (s.acquire([5, 6, 7, 1]), s.pos[a]) == (a, 3)  # the longest shared beginning
    assert s.pos[s.acquire([5, 6, 9])] == 2  # the whole prompt cached: its last token runs again for its logits
    s.step([a], torch.tensor([4]))
    assert s.cached[a] == [5, 6, 7]  # a decoded token is not a prompt's: never reused


def test_attention_window(lm):
    """The compiled step attends over the used positions rounded up to 64, never past the capacity."""
    model, _ = lm
    s = BatchSession(FastModel(model, matvec="mm"), 2, 200)
    assert [s.window(n) for n in (1, 64, 65, 130, 199, 200)] == [64, 64, 128, 192, 200, 200]


def test_queue_bound_and_bad_requests(lm):
    model, tok = lm
    b = ContinuousBatcher(model, tok, max_batch=1, ctx=64, max_queue=1, matvec="mm")  # not started: nothing runs
    cfg = GenerationConfig(max_new_tokens=2)
    b.submit(BatchRequest([5], cfg, lambda ev: None))  # takes the free slot
    b.submit(BatchRequest([5], cfg, lambda ev: None))  # waits
    with pytest.raises(QueueFull):
        b.submit(BatchRequest([5], cfg, lambda ev: None))
    with pytest.raises(ValueError, match="context"):
        b.submit(BatchRequest([5] * 64, cfg, lambda ev: None))
    with pytest.raises(ValueError, match="slots"):
        b.submit(BatchRequest([5], cfg, lambda ev: None, n=2))
