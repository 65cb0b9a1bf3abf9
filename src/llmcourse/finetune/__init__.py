"""Lab 4: supervised fine-tuning and preference tuning (DPO, ORPO) with LoRA, QLoRA (our NF4 base) or all
weights, merged and exported.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.finetune import LoraSettings, TrainConfig, finetune, merge_adapter
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="finetune",
    title="Fine-tuning: LoRA and QLoRA, DPO and ORPO",
    commands={
        "finetune": "SFT, DPO or ORPO fine-tuning (LoRA, QLoRA with an NF4 base, or full) -> adapter + merged model",
        "preference-pairs": "on-policy preference pairs from a model's own wrong answers to country questions",
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
    "trainer": ("TrainConfig", "TrainState", "train", "eval_loss", "PRESETS", "cosine_lr", "save_checkpoint",
                "load_checkpoint", "latest_checkpoint", "write_metrics", "plot_loss"),
    "run": ("finetune", "merge_adapter", "capital_accuracy", "FinetuneResult"),
    "preference": ("dpo_loss", "orpo_loss", "orpo_odds_ratio", "sequence_logps", "DPO_LOSSES"),
    "pref_data": ("read_pairs", "tokenize_pairs", "collate_pairs", "build_default_pairs", "write_pairs"),
    "pref_train": ("PreferenceConfig", "PreferenceObjective", "precompute_reference", "reference_logps"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
