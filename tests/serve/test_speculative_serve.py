"""``serve --speculative lookup``: a real server on 127.0.0.1 through the official ``openai`` client gives the
very tokens of plain greedy decoding, drafting by prompt lookup (eager and compiled multi-token steps)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from serve_helpers import Running, tiny_folder, tiny_lm  # noqa: F401  (fixtures)

from llmcourse.core.errors import UserError
from llmcourse.core.runtime import can_compile
from llmcourse.decoding import GenerationConfig, generate

# prompts that repeat themselves: the tiny model's greedy text copies them, so drafts get accepted
PROMPTS = ["the cat in the hat sat on the mat, the cat in the hat", "in the heat the ant ate the tea in the heat",
           "a tin, a tan, a ten, a tin, a tan", "hehehe the the the"]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


@pytest.mark.parametrize("matvec", ["mm", "compiled"])
def test_lookup_serves_the_tokens_of_plain_greedy(tiny_lm, matvec):
    if matvec == "compiled" and not can_compile():
        pytest.skip("no C++ compiler")
    compiled = matvec == "compiled"  # one slot: fewer step buckets to compile
    s = Running(tiny_lm, max_batch=1 if compiled else 2, ctx=128, matvec=matvec, speculative="lookup", draft_tokens=4,
                lookup_ngram=2)
    try:
        c = s.client()
        for p in PROMPTS[:2] if compiled else PROMPTS:
            r = c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
            ref = generate(tiny_lm.model, tiny_lm.tokenizer, p, GenerationConfig(max_new_tokens=24, eos_token_ids=()))
            assert r.choices[0].text == ref.sequences[0].text, p
            assert r.usage.completion_tokens == 24
        drafted = _metric(s.url, "llmcourse_speculative_drafted_tokens_total")
        accepted = _metric(s.url, "llmcourse_speculative_accepted_tokens_total")
        assert 0 < accepted <= drafted
        assert _metric(s.url, "llmcourse_decode_steps_total") < 4 * 23  # fewer forwards than tokens
        if compiled:
            return
        # two at once: the batched step (no drafting), the same text
        with ThreadPoolExecutor(2) as ex:
            both = list(ex.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=16,
                                                              temperature=0).choices[0].text, PROMPTS[:2]))
        for p, text in zip(PROMPTS[:2], both, strict=True):
            ref = generate(tiny_lm.model, tiny_lm.tokenizer, p, GenerationConfig(max_new_tokens=16, eos_token_ids=()))
            assert text == ref.sequences[0].text
        # a streamed chat answer, and a sampled one (sampling decodes as usual)
        msg = [{"role": "user", "content": PROMPTS[0]}]
        full = c.chat.completions.create(model="tiny", messages=msg, max_tokens=12, temperature=0)
        chunks = list(c.chat.completions.create(model="tiny", messages=msg, max_tokens=12, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
        assert c.chat.completions.create(model="tiny", messages=msg, max_tokens=5, seed=1).usage.completion_tokens == 5
    finally:
        s.close()


def test_bad_speculative_settings():
    from llmcourse.serve.app import ServeSettings

    for kw in ({"speculative": "draft"}, {"speculative": "lookup", "draft_tokens": 0},
               {"speculative": "lookup", "lookup_ngram": 0}):
        with pytest.raises(UserError):
            ServeSettings(**kw)
