"""Decoding lab: greedy, beam search and sampling, token-exact with transformers, fast on CPU, and visible.

Public API (other labs use only these names)::

    from llmcourse.decoding import GenerationConfig, generate
    out = generate(model, tokenizer, "I have a dream", GenerationConfig(strategy="beam", num_beams=4))
    out.sequences[0].text, out.tokens_per_second

``model`` is any transformers causal LM; Llama-family models (also with their ``nn.Linear``
modules swapped for another lab's int8 modules) run through :class:`FastLlama`.
"""

from llmcourse.decoding.beam import BeamRecorder, BeamResult, beam_search
from llmcourse.decoding.engine import (
    GeneratedSequence,
    GenerationConfig,
    GenerationOutput,
    StepRecord,
    chat_prompt_ids,
    generate,
    make_decoder,
    prepare,
)
from llmcourse.decoding.fast_llama import FastLlama
from llmcourse.decoding.samplers import CHAINS, SamplerSettings, apply_chain

__all__ = [
    "CHAINS", "BeamRecorder", "BeamResult", "FastLlama", "GeneratedSequence", "GenerationConfig",
    "GenerationOutput", "SamplerSettings", "StepRecord", "apply_chain", "beam_search", "chat_prompt_ids",
    "generate", "make_decoder", "prepare",
]
