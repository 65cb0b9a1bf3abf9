"""Lab 6: 4-bit (2/3/4/8-bit) quantization with GPTQ, on a CPU, into the standard GPTQ checkpoint.

Public API (imported lazily, so that declaring the lab costs nothing)::

    from llmcourse.quant.gptq import GPTQConfig, quantize_model, save_quantized, load_quantized, GPTQ, GPTQLinear
"""

from __future__ import annotations

import importlib
from typing import Any

from llmcourse.core.lab import Lab

LAB = Lab(
    name="gptq",
    title="4-bit quantization with GPTQ",
    commands={
        "quantize gptq": "GPTQ (Frantar et al. 2022), 2/3/4/8-bit, block by block -> a standard GPTQ checkpoint",
        "quantize rtn": "round-to-nearest baseline with GPTQ's options -> the same checkpoint format",
    },
    commands_module="llmcourse.quant.gptq.commands",
    tour="llmcourse.quant.gptq.tour:section",
    formats={"gptq": "llmcourse.quant.gptq.model:load_quantized"},
    docs="docs/gptq.md",
)

_PUBLIC = {
    "gptq": ("GPTQ", "QuantizedLayer", "find_params", "quantize", "codes", "rtn"),
    "pack": ("pack", "unpack", "pack_layer", "unpack_layer", "dequantize_layer", "BITS"),
    "linear": ("GPTQLinear",),
    "model": ("GPTQConfig", "quantize_model", "save_quantized", "load_quantized", "check_model",
              "check_calibration", "sequential_stages", "METHODS"),
}
_WHERE = {name: mod for mod, names in _PUBLIC.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LAB", *_WHERE]
