"""Lab 8: compression: pruning (magnitude, Wanda, SparseGPT; unstructured, N:M; depth and width) and
knowledge distillation that heals a pruned model.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.compress import PruneConfig, prune_model, sparsegpt, wanda_mask, drop_layers, shrink_mlp, distill_model
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="compress",
    title="Pruning and distillation",
    commands={
        "prune": "magnitude / Wanda / SparseGPT (unstructured or N:M), or drop layers / shrink the MLP -> an HF folder",
        "distill": "logit distillation (forward/reverse KL, temperature, hidden states) of a student -> an HF folder",
    },
    commands_module="llmcourse.compress.commands",
    tour="llmcourse.compress.tour:section",
    docs="docs/compression.md",
)

_PUBLIC = {
    "prune": ("PruneConfig", "prune_model", "prune_layer", "sparsegpt", "wanda_mask", "wanda_score", "magnitude_mask",
              "row_mask", "nm_mask", "parse_nm", "FeatureNorms", "SparseLayer", "model_sparsity", "METHODS"),
    "structured": ("layer_similarities", "block_distances", "choose_block", "choose_layers", "drop_layers",
                   "mlp_importance", "shrink_mlp", "parse_layers"),
    "distill": ("DistillConfig", "distill_model", "kd_loss", "plot_curves", "measure", "paired_gap", "token_windows"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
