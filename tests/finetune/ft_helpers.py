"""Fixtures of the fine-tuning tests: the default model's tokenizer (chat template) and tiny models using it."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

VOCAB = 49152  # the default tokenizer's vocabulary


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    from llmcourse.core.models import default_model_dir

    try:
        return AutoTokenizer.from_pretrained(default_model_dir())
    except Exception as e:  # no default model package installed: these tests need its tokenizer
        pytest.skip(f"default tokenizer unavailable ({type(e).__name__})")


def small_model(seed: int = 0, arch: str = "llama"):
    return tiny_model(arch, seed=seed, vocab_size=VOCAB, max_position_embeddings=512)


@pytest.fixture
def base_dir(tmp_path, tok):
    """A tiny random Llama with the default tokenizer, saved as a Hugging Face folder."""
    from llmcourse.core.models import save_hf

    d = tmp_path / "base"
    save_hf(small_model(), tok, d)
    return d


@pytest.fixture
def chat_jsonl(tmp_path):
    """12 prompt/response pairs and 2 'messages' examples."""
    p = tmp_path / "chats.jsonl"
    lines = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(12)]
    lines += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}]}] * 2
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p
