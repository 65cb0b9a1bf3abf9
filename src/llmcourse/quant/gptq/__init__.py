"""Lab 6: 4-bit (2/3/4/8-bit) quantization with GPTQ, on a CPU, into the standard GPTQ checkpoint.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.quant.gptq import GPTQConfig, quantize_model, save_quantized, load_quantized, GPTQ, GPTQLinear
"""

from __future__ import annotations

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="gptq",
    title="4-bit quantization with GPTQ",
    commands={
        "quantize gptq": "GPTQ (Frantar et al. 2022), 2/3/4/8-bit, block by block -> a standard GPTQ checkpoint",
        "quantize rtn": "round-to-nearest baseline with GPTQ's options -> the same checkpoint format",
    },
    commands_module="llmcourse.quant.gptq.commands",
    examples={"quantize gptq": "llmcourse quantize gptq --model default --bits 4 --out out/gptq-4bit",
              "quantize rtn": "llmcourse quantize rtn --model default --bits 4 --out out/rtn-4bit"},
    tour="llmcourse.quant.gptq.tour:section",
    formats={"gptq": "llmcourse.quant.gptq.model:load_quantized"},
    docs="docs/gptq.md",
)

_PUBLIC = {
    "gptq": ("GPTQ", "QuantizedLayer", "find_params", "quantize", "codes", "rtn"),
    "pack": ("pack", "unpack", "pack_layer", "unpack_layer", "dequantize_layer", "BITS"),
    "linear": ("GPTQLinear",),
    "model": ("GPTQConfig", "quantize_model", "save_quantized", "load_quantized", "check_model",
              "check_calibration", "sequential_stages", "collect_hessians", "METHODS"),
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
