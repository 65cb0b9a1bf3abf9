"""Lab 5: 8-bit quantization — absmax and zero-point (per tensor, row or group), LLM.int8(), weight-only int8.

Imports go one way, each module using only those above it:

* ``formulas`` — absmax / zero-point on tensors: :class:`QuantizedTensor`, ``quantize_tensor``;
* ``linear``, ``llm_int8`` — the runtime modules that store int8 (``Int8Linear``, ``Int8Embedding``,
  ``LLMInt8Linear``);
* ``model`` — whole models: ``quantized_state_dict`` (pure) apart from ``swap_modules`` (runtime),
  ``quantize_model``, ``dequantize_model``, folders (``save_quantized`` / ``load_quantized``);
* ``commands`` (``llmcourse quantize int8``) and ``tour`` (the tour section).

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.quant.int8 import Int8Config, quantize_model, save_quantized, load_quantized
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="int8",
    title="8-bit quantization",
    commands={"quantize int8": "8-bit quantization: absmax, zero-point or LLM.int8() -> a folder that reloads"},
    commands_module="llmcourse.quant.int8.commands",
    examples={"quantize int8": "llmcourse quantize int8 --model default --method llm.int8 --out out/llm-int8"},
    tour="llmcourse.quant.int8.tour:section",
    formats={"int8": "llmcourse.quant.int8.model:load_quantized"},
    docs="docs/quantization-8bit.md",
)

_PUBLIC = {
    "formulas": ("QuantizedTensor", "absmax_quantize", "zeropoint_quantize", "quantize_tensor", "fake_quantize",
                 "expand_stat", "METHODS", "GRANULARITIES"),
    "linear": ("Int8Linear", "Int8Embedding"),
    "llm_int8": ("LLMInt8Linear", "llm_int8_matmul"),
    "model": ("Int8Config", "quantized_state_dict", "swap_modules", "quantize_model", "quantize_llm_int8",
              "dequantize_model", "save_quantized", "load_quantized", "linear_weight_bytes", "model_bytes"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
