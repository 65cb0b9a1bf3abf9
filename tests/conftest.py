"""Shared fixtures: tiny random models of several architectures, and the default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# progress lines (stderr not a terminal) off: tests count stderr lines; tests/core/test_progress.py turns them on
os.environ.setdefault("LLMCOURSE_PROGRESS", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config of a small random causal LM (llama, qwen2 or gpt2)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        cls = LlamaConfig
    elif arch == "qwen2":
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        cls = Qwen2Config
    elif arch == "gpt2":
        kw = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
        cls = GPT2Config
    else:
        raise ValueError(arch)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_lm():
    """The default model (SmolLM2-135M-Instruct, fp32), loaded once per test session."""
    from llmcourse.core.models import load_model

    return load_model("default")
