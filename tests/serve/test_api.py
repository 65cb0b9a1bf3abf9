"""The OpenAI contract through the official ``openai`` client, against a real server on 127.0.0.1."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest
from serve_helpers import Running, server, tiny_folder, tiny_lm  # noqa: F401  (fixtures)

from llmcourse.decoding import GenerationConfig, generate

MSG = [{"role": "user", "content": "Say hello"}]


def test_models_and_health(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[1][:20]


def test_chat_completion_usage_counts(server, tiny_lm):
    from llmcourse.decoding import chat_prompt_ids

    r = server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=7, temperature=0)
    ch = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tiny_lm.tokenizer, MSG))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_completion_greedy_matches_generate(server, tiny_lm):
    r = server.client().completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    ref = generate(tiny_lm.model, tiny_lm.tokenizer, "the cat", GenerationConfig(max_new_tokens=12, eos_token_ids=()))
    assert r.choices[0].text == ref.sequences[0].text
    assert r.usage.prompt_tokens == len(tiny_lm.tokenizer("the cat").input_ids)


def test_stream_chunk_contract_with_usage(server):
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    last_choice = chunks[-2].choices[0]
    assert last_choice.finish_reason == "length" and not last_choice.delta.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    full = server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                                     "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "text_completion" and "usage" not in first


def test_stop_strings(server, tiny_lm):
    full = server.client().completions.create(model="tiny", prompt="in the", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]
    assert stop and text.index(stop) >= 1
    r = server.client().completions.create(model="tiny", prompt="in the", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(server.client().completions.create(model="tiny", prompt="in the", max_tokens=16, temperature=0,
                                                     stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_seed(server):
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, n=3, seed=5, temperature=1.0)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    again = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, n=3, seed=5, temperature=1.0)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    assert len({ch.message.content for ch in r.choices}) > 1
    chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, n=2, stream=True))
    finished = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_batched_greedy_equals_sequential(server, tiny_lm):
    prompts = ["hello there", "the cat sat on", "a", "in the beginning was the word and", "xyz", "tttt",
               "he said", "one two three four five six"]
    ref = [generate(tiny_lm.model, tiny_lm.tokenizer, p, GenerationConfig(max_new_tokens=20, eos_token_ids=()))
           .sequences[0].text for p in prompts]
    c = server.client()
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0)
                          .choices[0].text, prompts))
    assert got == ref


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "temperature": -1}, "temperature"),
    ({"messages": MSG, "top_p": 2}, "top_p"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "n": 99}, "n"),
    ({"messages": MSG, "stop": 5}, "stop"),
    ({"messages": MSG, "seed": "x"}, "seed"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
])
def test_bad_fields_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_other_errors(server):
    assert httpx.post(server.url + "/v1/chat/completions", content=b"{nope").status_code == 400
    assert httpx.post(server.url + "/v1/completions", json={"prompt": None}).status_code == 400
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x " * 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "unknown_field": [1]})
    assert ok.status_code == 200
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=-3)


def test_metrics(server):
    server.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmcourse_requests_total", "llmcourse_completion_tokens_total", "llmcourse_queue_depth",
                 "llmcourse_batch_size", "llmcourse_time_to_first_token_seconds_count"):
        assert name in text


def test_health_answers_at_once_while_the_step_compiles(tiny_lm, monkeypatch):
    """The server answers /health (and requests) while its step buckets compile in the background."""
    import json
    import time
    import urllib.request

    from llmcourse.core.runtime import can_compile

    if not can_compile():
        pytest.skip("no C++ compiler: nothing to warm up")
    monkeypatch.setenv("LLMCOURSE_COMPILE", "1")
    t0 = time.monotonic()
    s = Running(tiny_lm, max_batch=4, ctx=256)
    try:
        with urllib.request.urlopen(f"{s.url}/health", timeout=10) as r:
            first = json.loads(r.read())
        assert time.monotonic() - t0 < 10
        planned = len(s.app.state.batcher.session.warm_tasks())  # 4 row buckets x 3 windows
        assert first["status"] in ("warming", "ok") and first["warm_up"].endswith(f"/{planned}") and planned == 12
        r = s.client().completions.create(model="tiny", prompt="in the", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4  # served during the warm-up
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{s.url}/health", timeout=10) as r:
                if json.loads(r.read())["status"] == "ok":
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the warm-up did not finish")
    finally:
        s.close()


def test_sampling_defaults_from_generation_config_or_chat(tmp_path, server):
    """/v1/models shows the defaults a request without sampling fields gets: the model's
    generation_config.json where it samples, else the chat command's."""
    import json

    from llmcourse.decoding import CHAT_DEFAULTS, sampling_defaults

    card = server.client().models.list().data[0].model_dump()
    assert card["sampling_defaults"]["temperature"] == CHAT_DEFAULTS["temperature"]
    assert card["sampling_defaults"]["top_p"] == CHAT_DEFAULTS["top_p"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3,
                                                                  "top_p": 0.8, "top_k": 20}))
    d = sampling_defaults(tmp_path)
    assert (d["temperature"], d["top_p"], d["top_k"]) == (0.3, 0.8, 20) and "generation_config.json" in d["source"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.3}))
    assert sampling_defaults(tmp_path)["temperature"] == CHAT_DEFAULTS["temperature"]
