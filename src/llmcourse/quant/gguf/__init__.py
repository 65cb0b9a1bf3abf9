"""Lab 7: GGUF — llama.cpp's file format and quantization types in numpy, bit-exact with ggml.

Split by concern, imports in one direction (kernels -> quantize -> names/convert -> load -> presets
-> commands, tour):

* the container (read/write, the one header parser) is ``llmcourse.core.gguf_container``, shared with
  ``core.formats``' checks;
* ``names.py``: the supported architectures (``MODEL_TYPES``, one ``Arch`` per Hugging Face ``model_type``),
  HF <-> GGUF tensor names, GPT-2's Conv1D transpose, Llama's q/k permutation, Gemma's norm shift;
* ``convert.py``: Hugging Face model -> GGUF file, as llama.cpp's ``convert_hf_to_gguf.py``;
* ``load.py``: GGUF -> fp32 tensors -> a Hugging Face model;
* ``presets.py``: llama.cpp's per-tensor type rules and the quantized file (``quantize_gguf``);
* kernels: ``blocks.py`` (byte layout of every block type), ``searches.py`` (ggml's float32
  primitives and scale searches), ``legacy.py`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), ``kquants.py``
  (Q2_K ... Q6_K), ``quantize.py`` (the public entry: ``quantize``, ``dequantize``, ``QUANT_TYPES``);
* ``imatrix.py``: the importance matrix (collected through ``core.modules``; llama.cpp's GGUF and
  legacy .dat files).
"""

from llmcourse.core.lab import Lab, lazy_exports

LAB = Lab(
    name="gguf",
    title="GGUF and llama.cpp",
    commands={
        "convert gguf": "Hugging Face model -> GGUF file (f32/f16/bf16), as llama.cpp's convert_hf_to_gguf.py",
        "quantize gguf": "quantize to GGUF with llama.cpp's presets (Q4_K_M, Q8_0, ...), one file per type",
        "imatrix": "importance matrix (mean squared activations per column) for --imatrix",
    },
    commands_module="llmcourse.quant.gguf.commands",
    examples={"quantize gguf": "llmcourse quantize gguf --model default --type Q4_K_M,Q8_0 --out out/gguf",
              "convert gguf": "llmcourse convert gguf --model default --out out/model-f32.gguf"},
    tour="llmcourse.quant.gguf.tour:section",
    docs="docs/gguf.md",
    file_formats={b"GGUF": "llmcourse.quant.gguf.load:load_model"},
)

_PUBLIC = {
    "convert": ("convert_to_gguf", "from_hf", "OUT_TYPES"),
    "presets": ("quantize_gguf", "get_preset"),
    "quantize": ("dequantize", "QUANT_TYPES"),
    "load": ("load_model",),
    "names": ("MODEL_TYPES",),  # Hugging Face model_type -> what the converter does: the supported ones
}
__getattr__, _names = lazy_exports(__name__, _PUBLIC)
__all__ = ["LAB", *_names]
