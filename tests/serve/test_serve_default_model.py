"""The server with the default model (slow): the openai client, and batched greedy == sequential."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import Running, server, tiny_folder, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "List three uses of a paperclip.", "Why is the sky blue?", "Tell me about elephants.",
           "How do plants make food?", "What is a prime number?"]


@pytest.fixture(scope="module")
def big(default_lm):
    s = Running(default_lm, max_batch=8, ctx=512)
    yield s
    s.close()


def ask(server, question: str, **kw):
    return server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                   temperature=0, **kw)


def test_chat_stream_and_usage(big, default_lm):
    from llmcourse.decoding import chat_prompt_ids

    chunks = list(ask(big, PROMPTS[0], max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(chat_prompt_ids(default_lm.tokenizer,
                                                      [{"role": "user", "content": PROMPTS[0]}]))
    assert 1 <= usage.completion_tokens <= 24


def test_eight_concurrent_equal_sequential(big):
    sequential = [ask(big, q, max_tokens=32).choices[0].message.content for q in PROMPTS]
    with ThreadPoolExecutor(8) as ex:
        batched = list(ex.map(lambda q: ask(big, q, max_tokens=32).choices[0].message.content, PROMPTS))
    assert batched == sequential


def test_default_sampling_answers(big):
    """A plain chat request (no sampling field) samples with the chat defaults: Paris, 4 times of 5 at least."""
    answers = [big.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24, seed=seed,
    ).choices[0].message.content for seed in range(5)]
    assert sum("Paris" in a for a in answers) >= 4, answers
