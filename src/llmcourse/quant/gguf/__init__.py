"""Lab 7: GGUF — llama.cpp's file format and quantization types in numpy, bit-exact with ggml.

``quantize.py`` is the public entry point (``quantize``, ``dequantize``, ``QUANT_TYPES``);
``blocks.py`` holds the byte layout of every block type, ``searches.py`` ggml's float32
primitives and scale searches, ``legacy.py`` the 32-wide types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
``kquants.py`` the 256-wide k-quants (Q2_K ... Q6_K) and ``imatrix.py`` the importance matrix
(computing it with forward hooks, and llama.cpp's GGUF and legacy .dat files).
"""

from llmcourse.core.lab import Lab

LAB = Lab(
    name="gguf",
    title="GGUF and llama.cpp",
    commands={
        "convert gguf": "Hugging Face model -> GGUF file (f32/f16/bf16), as llama.cpp's convert_hf_to_gguf.py",
        "quantize gguf": "quantize to GGUF with llama.cpp's presets (Q4_K_M, Q8_0, ...), one file per type",
        "imatrix": "importance matrix (mean squared activations per column) for --imatrix",
    },
    commands_module="llmcourse.quant.gguf.commands",
    tour="llmcourse.quant.gguf.tour:section",
    docs="docs/gguf.md",
)
