"""Tiny GPTQ models and layers shared by the GPTQ tests (test_blocks.py, test_decode.py)."""

from __future__ import annotations

import torch
from conftest import tiny_model

from llmcourse.quant.gptq.linear import GPTQLinear
from llmcourse.quant.gptq.model import GPTQConfig, quantize_model
from llmcourse.quant.gptq.pack import pack_layer


def quantized_tiny(seed: int, **config) -> torch.nn.Module:
    """A tiny random Llama quantized by GPTQ (``GPTQConfig(**config)``) on 4 random windows of 64 tokens."""
    m = tiny_model("llama", seed=seed)
    windows = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(m, windows, GPTQConfig(**config))
    return m


def random_layer(o: int, i: int, group: int, sym: bool, act_order: bool, seed: int = 0, bits: int = 4) -> GPTQLinear:
    """A random GPTQ layer (checkpoint tensors, with a bias) with a ragged last group when ``group`` does not
    divide ``i``; symmetric: every zero point at ``2^(bits-1)``; act-order: ``g_idx`` shuffled."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(i) // group
    if act_order:
        g_idx = g_idx[torch.randperm(i, generator=gen)]
    groups = int(g_idx.max()) + 1
    zeros = (torch.full((o, groups), 2.0 ** (bits - 1)) if sym
             else torch.randint(1, 2 ** bits, (o, groups), generator=gen).float())
    t = pack_layer(torch.randint(0, 2 ** bits, (o, i), generator=gen),
                   torch.rand(o, groups, generator=gen) * 0.02 + 1e-3, zeros, g_idx, bits,
                   bias=torch.randn(o, generator=gen) * 0.1)
    return GPTQLinear(i, o, bits, t)
