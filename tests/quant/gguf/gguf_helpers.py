"""Helpers for the GGUF converter/preset tests: tiny tokenizers and llama.cpp as the reference."""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def byte_tokenizer():
    """A tiny byte-level BPE tokenizer: 256 byte tokens, 4 merges, 3 special tokens (ids 0..262)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = list(bytes_to_unicode().values())
    merged = ["Ġt", "he", "Ġa", "in"]
    vocab = {t: i for i, t in enumerate(specials + byte_chars + merged)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


def default_tokenizer():
    """The default model's tokenizer (SmolLM2, 49152 tokens), without loading its weights."""
    from transformers import AutoTokenizer

    from llmcourse.core.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@contextmanager
def quiet_stderr():
    """Silence llama.cpp's C-level logging on fd 2 while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def llama_quantize(src: Path, out: Path, ftype: int, pure: bool = False,
                   imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's ``llama_model_quantize`` (single thread) from ``src`` into ``out``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    params.pure = pure
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        params.imatrix = arr
        keep.append(arr)
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids``: (len(ids), vocab)."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False, n_threads=2,
                              type_k=0, type_v=0)
        llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(path: Path, ids: list[int], n: int, eos: int | None) -> list[int]:
    """llama.cpp greedy continuation of ``ids`` (argmax of its logits), up to ``n`` tokens or ``eos``."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + n + 8, logits_all=True, verbose=False, n_threads=2,
                              type_k=0, type_v=0)
        llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(t)
            if t == eos:
                break
            llm.eval([t])
    return out


def hf_greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Hugging Face greedy continuation, with the same stopping rule as :func:`llama_greedy`."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(ids):].tolist()
    return out


def tensor_table(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, type, ggml shape) of every tensor of a GGUF, through gguf-py's own reader."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in r.tensors]
