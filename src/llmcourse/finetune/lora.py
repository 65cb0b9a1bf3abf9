"""LoRA and QLoRA through PEFT (Hu et al. 2021, "LoRA"; Dettmers et al. 2023, "QLoRA").

LoRA freezes a linear layer's weight ``W`` (out, in) and learns a low-rank update:

    h = W x + (alpha / r) B A x         A: (r, in) ~ Kaiming-uniform, B: (out, r) = 0 at the start

so training starts from the base model exactly. rsLoRA (Kalajdzievski 2023) scales by ``alpha / sqrt(r)``
instead, which keeps the update's size stable as ``r`` grows. DoRA (Liu et al. 2024) splits the merged
weight into a magnitude and a direction and learns the magnitude ``m`` (one value per output) too:

    W' = m * (W + s B A) / ||W + s B A||_c     (||.||_c: the norm of each output row)

Merging writes ``W + s B A`` (or DoRA's ``W'``) into a plain linear layer: the merged model computes the
adapter model's function with no extra cost. QLoRA keeps ``W`` frozen in 4-bit NF4
(:mod:`llmcourse.finetune.nf4`) and trains the same ``A``, ``B`` in fp32.

PEFT does the wrapping (``LoraConfig`` + ``get_peft_model``): the adapter folder it writes is the one
every PEFT user loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.modules import linear_layers, matches, set_module
from llmcourse.finetune.nf4 import NF4Linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def split_targets(text: str) -> list[str]:
    """``--targets q_proj, v_proj`` -> ``["q_proj", "v_proj"]`` (``all-linear`` is resolved against the model)."""
    return [t.strip() for t in text.split(",") if t.strip()]
METHODS = ("lora", "qlora", "full")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters, validated at construction. Fields with help text are ``finetune``'s flags."""

    r: int = option(16, "LoRA rank r. Default: 16", flag="--lora-r", type=int)
    alpha: float | None = option(None, "LoRA alpha; scale alpha/r. Default: 2 r", flag="--lora-alpha")
    dropout: float = option(0.05, "dropout on the LoRA input. Default: 0.05", flag="--lora-dropout")
    targets: list[str] = option(list(DEFAULT_TARGETS), "comma-separated module names, or all-linear. Default: "
                                + ",".join(DEFAULT_TARGETS), type=split_targets)
    rslora: bool = option(False, "rank-stabilised scale alpha/sqrt(r)")
    dora: bool = option(False, "DoRA: learn a magnitude per output too")

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"LoRA rank r must be a positive integer, got {self.r}", "pass --lora-r 8 (or 16, 64)")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if self.alpha <= 0:
            raise UserError(f"LoRA alpha must be > 0, got {self.alpha}", "pass --lora-alpha 16 (often 2 r)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}", "pass --lora-dropout 0.05")
        if not self.targets:
            raise UserError("no LoRA target modules", "pass --targets q_proj,v_proj (or 'all-linear')")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The target names (``all-linear``: every linear layer but the output head); each must exist."""
    layers = [n for n, _ in linear_layers(model)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == ["all-linear"]:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in linear_layers(model) if m is not head})
        return names
    for t in targets:
        if not any(matches(n, [t]) for n in layers):
            short = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise UserError(f"LoRA target module {t!r} does not exist in this model",
                            f"use some of {', '.join(short)} (or all-linear)")
    return list(targets)


def quantize_base_nf4(model: nn.Module, double_quant: bool = True) -> int:
    """Replace every linear layer but the output head by :class:`NF4Linear` (in place); returns how many."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for name, m in linear_layers(model):
        if m is head or not isinstance(m, nn.Linear):
            continue
        set_module(model, name, NF4Linear(m, double_quant))
        n += 1
    return n


def peft_config(settings: LoraSettings, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, use_rslora=settings.rslora, use_dora=settings.dora,
                      bias="none", task_type="CAUSAL_LM")


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a transformers model (``get_peft_model``, ``PeftModel.from_pretrained``).

    PEFT 0.21.2, the newest release, reads ``model.is_gradient_checkpointing`` in ``PeftModel.__init__``:
    transformers 5 renamed it ``is_activation_checkpointing`` and warns (FutureWarning) on the old name.
    That read is PEFT's own, not ours (our calls use the new names: ``trainer.set_checkpointing``), so
    only that one message is filtered here, only while PEFT wraps; any other warning shows. Drop this
    when PEFT reads the new name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model: nn.Module, settings: LoraSettings, method: str = "lora") -> nn.Module:
    """The model with LoRA adapters on ``settings.targets`` (a ``PeftModel``); for ``qlora`` the base linear
    layers are NF4 first. Only the adapters train."""
    from peft import get_peft_model

    targets = resolve_targets(model, settings.targets)
    if method == "qlora":
        quantize_base_nf4(model)
    from llmcourse.finetune.fused import fuse_lora

    for p in model.parameters():
        p.requires_grad_(False)
    with peft_wrapping():
        peft_model = get_peft_model(model, peft_config(settings, targets))
    fuse_lora(peft_model)  # same function, fewer passes over the activations
    return peft_model


def prepare_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def dequantize_nf4_layers(model: nn.Module) -> int:
    """Replace every :class:`NF4Linear` (also a PEFT wrapper's ``base_layer``) by a plain de-quantized linear."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            set_module(model, name, m.to_linear())
            n += 1
    return n


def merge(peft_model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters merged into the weights (PEFT's ``merge_and_unload``).
    An NF4 base is de-quantized first (the merged weights are then the NF4 base plus the update)."""
    dequantize_nf4_layers(peft_model)
    return peft_model.merge_and_unload()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (NF4 codes count as 2 weights per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(2 * m.W_q.numel() for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total
