"""A real server on 127.0.0.1 (a free port) serving a tiny random Llama saved to a temp folder.

The test modules import the fixtures from here (``from serve_helpers import server, tiny_lm, ...``).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest


def tiny_model(*args, **kw):
    """tests/conftest.py's tiny random model (loaded by path: this folder's conftest shadows the name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiny_model(*args, **kw)


def byte_tokenizer():
    """A byte-level BPE tokenizer: 3 special tokens (ids 0-2, bos 1, eos 2), 256 bytes, 4 merges; a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġa", "in"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from llmcourse.core.models import save_hf

    path = tmp_path_factory.mktemp("tiny-serve")
    save_hf(tiny_model("llama", vocab_size=263, max_position_embeddings=512), byte_tokenizer(), path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_folder):
    from llmcourse.core.models import load_model

    return load_model(str(tiny_folder))


class Running:
    """A uvicorn server in a thread; ``url`` is its base address."""

    def __init__(self, lm, **settings) -> None:
        import uvicorn

        from llmcourse.serve.app import ServeSettings, create_app

        self.app = create_app(lm, ServeSettings(model_name="tiny", **settings))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 300  # the start compiles the step buckets (slow on a busy machine)
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_lm):
    s = Running(tiny_lm, max_batch=8, max_queue=4, ctx=256)
    yield s
    s.close()
