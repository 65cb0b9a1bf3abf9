"""Lab 4: supervised fine-tuning with LoRA, QLoRA (our NF4 base) or all weights, merged and exported.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.finetune import LoraSettings, TrainConfig, finetune, merge_adapter
"""

from __future__ import annotations

import importlib
from typing import Any

from llmcourse.core.lab import Lab

LAB = Lab(
    name="finetune",
    title="Fine-tuning: LoRA and QLoRA",
    commands={
        "finetune": "supervised fine-tuning (LoRA, QLoRA with an NF4 base, or full) -> adapter + merged model",
        "merge": "merge a PEFT LoRA adapter into its base model -> a plain Hugging Face folder (optionally GGUF)",
    },
    commands_module="llmcourse.finetune.commands",
    tour="llmcourse.finetune.tour:section",
    requires={"peft": "pip install 'llmcourse[finetune]'"},
    docs="docs/finetune.md",
)

_PUBLIC = {
    "lora": ("LoraSettings", "add_lora", "merge", "quantize_base_nf4", "trainable_parameters", "METHODS"),
    "nf4": ("NF4Linear", "NF4_CODE", "nf4_code_book", "quantize_nf4", "dequantize_nf4"),
    "sft_data": ("load_sft_data", "tokenize_all", "pack_rows", "pad_rows", "collate", "read_jsonl"),
    "trainer": ("TrainConfig", "TrainState", "train", "eval_loss", "PRESETS"),
    "run": ("finetune", "merge_adapter", "capital_accuracy", "FinetuneResult"),
}
_WHERE = {name: mod for mod, names in _PUBLIC.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LAB", *_WHERE]
