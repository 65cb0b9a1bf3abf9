"""Decoding lab: greedy, beam search and sampling, token-exact with transformers, fast on CPU, and visible.

Public API (other labs use only these names; imported lazily, so declaring the lab costs nothing)::

    from llmcourse.decoding import GenerationConfig, generate
    out = generate(model, tokenizer, "I have a dream", GenerationConfig(strategy="beam", num_beams=4))
    out.sequences[0].text, out.tokens_per_second

``model`` is any transformers causal LM; the architectures of the model runtime
(:mod:`llmcourse.core.runtime`: Llama, Mistral, Qwen2/3, SmolLM3, Phi-3, Gemma 3 — also with their
``nn.Linear`` modules swapped for another lab's modules that implement its ``DecodePlugin``) run through
its one decoder layer. Weights are shared, state is per call: each generation owns a session (its KV
cache), so concurrent generations on one model are safe.
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="decoding",
    title="Decoding strategies",
    commands={
        "generate": "generate text: greedy, beam search or sampling (fast on CPU)",
        "chat": "chat with a model through its chat template (interactive, or one --prompt)",
    },
    commands_module="llmcourse.decoding.commands",
    tour="llmcourse.decoding.tour:section",
    docs="docs/decoding.md",
)

_PUBLIC = {
    "beam": ("BeamRecorder", "BeamResult", "beam_search"),
    "engine": ("GeneratedSequence", "GenerationConfig", "GenerationOutput", "StepRecord", "chat_prompt_ids",
               "generate", "make_decoder", "model_eos_ids", "prepare", "TextStream", "CHAT_DEFAULTS",
               "sampling_defaults"),
    "samplers": ("CHAINS", "SamplerSettings", "apply_chain", "sample"),
    "speculative": ("PromptLookup", "SpeculativeConfig", "SpeculativeOutput", "draw_strip", "speculative_generate"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
