"""Shared fixtures: tiny random models of several architectures, and the default model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# progress lines (stderr not a terminal) off: tests count stderr lines; tests/core/test_progress.py turns them on
os.environ.setdefault("LLMCOURSE_PROGRESS", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config of a small random causal LM: gpt2 or one of the runtime's architectures
    (llama, qwen2, qwen3, mistral, smollm3, phi3, gemma3_text; those with sliding windows get a window of 8
    positions, so that tests longer than that exercise it)."""
    import transformers
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
    elif arch in NEW_ARCHS:
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=arch != "phi3", bos_token_id=1, eos_token_id=2, pad_token_id=0)
        kw.update(NEW_ARCHS[arch][1])
        cls = getattr(transformers, NEW_ARCHS[arch][0])
    else:
        raise ValueError(arch)
    kw.update(overrides)
    return cls(**kw)


NEW_ARCHS = {  # model_type -> (config class, what differs in the tiny config)
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 1, 1, 0])),
    "phi3": ("Phi3Config", dict(sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                   "partial_rotary_factor": 0.5})),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "sliding_attention",
                                                          "sliding_attention", "full_attention"])),
}
RUNTIME_ARCHS = ("llama", "qwen2", *NEW_ARCHS)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    if arch == "gemma3_text":  # its norms start at w = 0 (a scale of 1 + w): make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_default_tokenizer(dst: Path, chat_template: bool = False) -> None:
    """Copy the default model's tokenizer (SmolLM2 BPE, 49,152 tokens; with ``chat_template``, its template too)."""
    from llmcourse.core.models import default_model_dir

    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, Path(dst) / name)
    template = default_model_dir() / "chat_template.jinja"
    if chat_template and template.exists():
        shutil.copy(template, Path(dst) / template.name)


def tiny_folder(path: Path, arch: str = "llama", seed: int = 0, chat_template: bool = False, **overrides) -> Path:
    """:func:`tiny_model` saved as a Hugging Face folder at ``path`` with the default model's tokenizer (its
    vocabulary size unless ``vocab_size`` is given), for commands that load a model by path."""
    tiny_model(arch, seed=seed, **{"vocab_size": 49152, **overrides}).save_pretrained(path)
    copy_default_tokenizer(path, chat_template)
    return Path(path)


# functions that read an LLMCOURSE_ override once per process (functools.cache), besides KernelOptions.detect
ENV_SWITCHES = (
    ("llmcourse.core.runtime.model", "forced_layers_per_call"),  # LLMCOURSE_STEP_LAYERS
    ("llmcourse.quant.int8.linear", "kernel_choice"),  # LLMCOURSE_INT8_KERNEL
    ("llmcourse.quant.gptq.blocks", "kernel_choice"),  # LLMCOURSE_GPTQ_KERNEL
    ("llmcourse.quant.gptq.blocks", "head_choice"),  # LLMCOURSE_GPTQ_HEAD
    ("llmcourse.quant.gguf.load", "blocks_by_default"),  # LLMCOURSE_GGUF_BLOCKS
    ("llmcourse.core.runtime.kernels", "interleaving"),  # LLMCOURSE_BLOCK_INTERLEAVE
    ("llmcourse.core.runtime.compile", "skip_repeat_guards"),  # LLMCOURSE_GUARDS
)


def _forget_env_switches() -> None:
    from llmcourse.core.runtime import KernelOptions

    KernelOptions.detect.cache_clear()
    for module, name in ENV_SWITCHES:
        if module in sys.modules:  # a module not imported yet has cached nothing
            getattr(sys.modules[module], name).cache_clear()


@pytest.fixture(autouse=True)
def _kernel_options_from_env():
    """The runtime and the labs read their environment overrides once per process (KernelOptions.detect,
    ENV_SWITCHES): tests that set them with monkeypatch get them read again, and leave no cached choice behind.
    A test that changes one in the middle calls that function's ``cache_clear()`` itself."""
    _forget_env_switches()
    yield
    _forget_env_switches()


@pytest.fixture(scope="session")
def default_lm():
    """The default model (SmolLM2-135M-Instruct, fp32), loaded once per test session."""
    from llmcourse.core.models import load_model

    return load_model("default")


@pytest.fixture(autouse=True)
def _one_thread_in_compress(request):
    """One compute thread in tests/compress: their tensors are small, and on the shared 2-core machine a second
    thread that waits for a busy core made the default model's 30 blocks on 2 x 128 tokens take 26 s instead of
    2.2 s (measured 2026-12-07, load average ~10). Restored after each test. (Here, not in a tests/compress
    conftest.py: a second module named ``conftest`` would shadow this one for ``from conftest import ...``.)"""
    if "compress" not in request.node.path.parts:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compiled_greedy_and_reference(model, prompt: list[int], monkeypatch, var: str, reference: str, kernel: str,
                                  choice, n: int = 32) -> tuple[list[int], list[int]]:
    """``n`` greedy tokens of the runtime's compiled step with the switch ``var=kernel``, and transformers'
    ``generate()`` with ``var=reference`` (the weight-only product), for the block-kernel equivalence tests of
    the int8 and GPTQ labs; ``choice`` is the switch's read-once function (its cache is cleared at each change)."""
    dec = pytest.importorskip("llmcourse.decoding", reason="decoding lab not present")
    from llmcourse.core import runtime as fl

    monkeypatch.setenv("LLMCOURSE_COMPILE", "1")
    monkeypatch.setenv(var, reference)
    choice.cache_clear()  # read once per process
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    monkeypatch.setenv(var, kernel)
    choice.cache_clear()
    fast = fl.FastModel(model, "compiled")
    out = dec.generate(fast, None, prompt, dec.GenerationConfig(max_new_tokens=n, eos_token_ids=()))
    assert out.backend == "fast" and fast.matvec == "compiled" and fast.warm
    return out.sequences[0].token_ids, ref
