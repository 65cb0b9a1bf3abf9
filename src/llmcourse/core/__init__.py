"""Shared core: model loading, data, evaluation, traversal, reports, errors and output conventions.

Core is also the first entry of the lab table: the ``models``, ``eval`` and ``convert hf`` commands
and the tour's opening section (the model's card and perplexity).
"""

from llmcourse.core.lab import Lab

LAB = Lab(
    name="core",
    title="The model",
    commands={
        "models": "load a model and show its card (parameters, bytes, architecture)",
        "eval perplexity": "sliding-window perplexity (the Hugging Face recipe)",
        "eval compare": "KL divergence and top-1 agreement of a model vs a reference model",
        "convert hf": "any model (GGUF, HF folder, default, quantized) -> HF safetensors folder",
    },
    commands_module="llmcourse.core.commands",
    examples={
        "eval perplexity": "llmcourse eval perplexity --model default --max-tokens 4096",
        "eval compare": "llmcourse eval compare --model out/int8 --reference default --max-tokens 4096",
        "convert hf": "llmcourse convert hf --model model.gguf --out out/hf",
    },
    tour="llmcourse.core.tour_section:section",
    docs="docs/evaluation.md",
)
