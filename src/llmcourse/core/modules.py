"""Walking a causal LM's modules: its linear layers, tied embeddings, decoder blocks, and their inputs.

Shared by every lab that rewrites or measures layers (int8, the importance matrix, GPTQ, the loss
landscape, LoRA), so each one finds "the linear layers" and "the inputs of a layer" the same way:

* :func:`linear_layers` — ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear stored transposed),
  with :func:`linear_weight` giving every weight as (out, in);
* :func:`set_module` — replace a submodule by its dotted name;
* :func:`tied_embeddings` / :func:`output_head` — the input embedding and output head, and whether
  they share one tensor;
* :func:`input_hooks` — call ``fn(name, x)`` with the input of chosen modules during forwards;
* :func:`decoder_blocks` and :func:`block_inputs` — the transformer blocks, and the hidden states
  (with the keyword arguments the model passes, e.g. rotary tables) that enter the first one, so
  a lab can run the model one block at a time (GPTQ's sequential quantization);
  :func:`float_decoder_blocks` checks first that the model is not quantized already.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmcourse.core.errors import UserError


def is_linear(m: nn.Module) -> bool:
    """``nn.Linear``, or GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` stored (in, out))."""
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a ``Conv1D`` (a transposed view for the latter)."""
    return m.weight.detach() if isinstance(m, nn.Linear) else m.weight.detach().t()


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a dotted module name is one of ``patterns`` or ends with ``.pattern``."""
    return any(name == s or name.endswith("." + s) for s in patterns)


def linear_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer (``nn.Linear`` / ``Conv1D``) in order, minus ``skip``."""
    skip = list(skip)
    return [(n, m) for n, m in model.named_modules() if is_linear(m) and not matches(n, skip)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The dotted name of ``module`` inside ``model`` (None if absent)."""
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def output_head(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(name, module) of the output projection (``lm_head``), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module_name(model, head), head


def tied_embeddings(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of (input embedding, output head) when they share one weight tensor, else (None, None)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None or not hasattr(emb, "weight") or not hasattr(head, "weight"):
        return None, None
    if emb.weight.data_ptr() != head.weight.data_ptr():
        return None, None
    return module_name(model, emb), module_name(model, head)


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While inside, every forward of ``modules[name]`` calls ``fn(name, x)`` with its input
    flattened to (tokens, features), detached. The hooks are removed on exit, also after an error."""

    def hook(name: str):
        def call(_mod: nn.Module, inputs: tuple, _out: Any) -> None:
            x = inputs[0].detach()
            fn(name, x.reshape(-1, x.shape[-1]))
        return call

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, list) of the transformer blocks: ``model.layers`` (Llama, Qwen2, Mistral...) or
    ``transformer.h`` (GPT-2)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def float_decoder_blocks(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    """:func:`decoder_blocks` of a model that ``method`` (e.g. "GPTQ", "pruning") will rewrite: a one-line
    UserError when a module already holds quantized weights (it lists them in ``weight_buffers`` or counts
    them with ``weight_count()``, as ``LoadedModel.n_params`` reads them) or the blocks cannot be found."""
    if any(hasattr(m, "weight_buffers") or hasattr(m, "weight_count") for m in model.modules()):
        raise UserError("the model is already quantized", f"run {method} on the original (floating-point) model")
    try:
        return decoder_blocks(model)
    except ValueError as e:
        raise UserError(str(e), f"{method} needs a decoder-only model with Llama/Qwen2/GPT-2-style blocks") from None


@dataclass
class BlockInput:
    """What enters a decoder block for one window: the hidden states and the model's keyword arguments."""

    hidden: torch.Tensor  # (1, T, H)
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, windows: Iterable[torch.Tensor]) -> list[BlockInput]:
    """Run the model's embeddings for each token window (1-D or (1, T)) and capture what enters the
    first decoder block (the forward stops there). Running ``block(inp.hidden, **inp.kwargs)``
    block after block then reproduces the model's forward one block at a time."""
    _, blocks = decoder_blocks(model)
    first = blocks[0]
    caught: list[BlockInput] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache",
                                                            "use_cache", "past_key_value")}
        caught.append(BlockInput(hidden.detach(), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for w in windows:
            ids = torch.as_tensor(w).reshape(1, -1)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return caught


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """One decoder block on a captured input: the hidden states it outputs, (1, T, H)."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out
