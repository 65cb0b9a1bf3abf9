"""The model runtime: one decoder layer for every architecture and every path that runs a model.

- :mod:`.arch` — what differs between architectures (:class:`Arch`, read from a transformers config);
- :mod:`.weights` — the weight kinds (:class:`Dense`, :class:`RowCodes`, :class:`GroupCodes`,
  :class:`PackedCodes`, :class:`ModuleWeight`), their products and the packing helpers;
- :mod:`.layer` — THE decoder layer (norms, q/k/v, RoPE, cache write, attention, MLP) and the head;
- :mod:`.model` — :class:`FastModel` (a model's weights in those kinds) and :class:`DecodeSession` (state);
- :mod:`.compile` — how TorchInductor is used (options, recompile limits).

The decoding lab's generation loop, beam search and the server's continuous batching run on top.
"""

from llmcourse.core.runtime.arch import SUPPORTED, Arch, LayerKind, arch_of, check_supported, supports
from llmcourse.core.runtime.compile import can_compile
from llmcourse.core.runtime.layer import LayerWeights, attention, decoder_layer, head, rms_norm
from llmcourse.core.runtime.model import (
    CAPACITY_STEP,
    MATVECS,
    DecodeSession,
    FastModel,
    auto_matvec,
    compilable,
    held_runtime,
    layer_modules,
    projections,
    runtime_for,
)
from llmcourse.core.runtime.weights import (
    PACKED_BITS,
    DecodePlugin,
    Dense,
    GroupCodes,
    KernelOptions,
    ModuleWeight,
    PackedCodes,
    RowCodes,
    Weight,
    WordsDequantizer,
    dequantize_words_eager,
    pack_words,
    packed_dot,
    project,
    unpack_words,
)

__all__ = [
    "CAPACITY_STEP", "MATVECS", "PACKED_BITS", "SUPPORTED", "Arch", "DecodePlugin", "DecodeSession", "Dense",
    "FastModel", "GroupCodes", "KernelOptions", "LayerKind", "LayerWeights", "ModuleWeight", "PackedCodes",
    "RowCodes", "Weight", "WordsDequantizer", "arch_of", "attention", "auto_matvec", "can_compile",
    "check_supported", "compilable", "decoder_layer", "dequantize_words_eager", "head", "held_runtime",
    "layer_modules", "pack_words", "packed_dot", "project", "projections", "rms_norm", "runtime_for",
    "supports", "unpack_words",
]
