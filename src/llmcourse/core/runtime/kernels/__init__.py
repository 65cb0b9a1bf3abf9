"""GGUF block kernels: ``y = x Wᵀ`` with ``W`` kept as ggml's quantized blocks and ``x`` quantized to 8 bits.

The products of llama.cpp's CPU backend (``ggml_vec_dot_q4_0_q8_0``, ``..._q4_K_q8_K``, ...), written
for this project in ``blocks.cpp``/``blocks_impl.h``: each activation row is cut into blocks and
quantized on the fly, ``a = d_a · q_a`` with ``d_a = max|x| / 127`` (32-value blocks with an fp16-rounded
scale for the legacy types, as ggml's Q8_0; 256-value blocks with 16-value sums for the k-quants, as
Q8_K); a weight block is ``w = d · (q - z)`` (Q4_0 ``z = 8``, Q5_0 ``z = 16``, Q8_0 ``z = 0``),
``w = d · q + m`` (Q4_1, Q5_1), or per 32/16-value sub-block ``w = d · sc_j · q - dmin · m_j`` (Q4_K,
Q5_K) and ``w = d · sc_j · (q - 32)`` (Q6_K). Then per block

    Σ_i w_i a_i = d d_a (Σ_i q_i q_a,i − z Σ_i q_a,i)       (and + m d_a Σ q_a, − dmin d_a Σ_j m_j Σ_{i∈j} q_a,i)

where the sums of products are exact 32-bit integer sums (``vpmaddubsw``+``vpmaddwd`` on AVX2,
``vpdpbusd`` with AVX-512 VNNI) and the code sums of the activations are computed once per row. So the
only difference from de-quantize-then-multiply is the 8-bit rounding of the activations (and fp32
summation order).

Why a C++ extension: PyTorch's own quantized CPU products do not cover these layouts —
``_weight_int8pack_mm`` is weight-only int8 with a per-row scale (fp32 activations; 13.8 ms for a
49152x576 product here, shared/MACHINE.md), ``_weight_int4pack_mm_for_cpu`` takes 4-bit codes with
bf16 group scales and zero points in its own packed layout (no Q4_K sub-block scales, no Q6_K, no
8-bit activations), and torchao's CPU int8 paths dispatch to the same or to oneDNN kernels that need
weights repacked into their format. Inductor generates no ``vpdpbusd``/``vpmaddubsw`` from a
reduction over int8 values. ggml's products are simple integer dot products over the stored blocks,
so ~500 lines of C++ with intrinsics, compiled once per machine by ``torch.utils.cpp_extension.load``
(the system compiler, as Inductor uses) and cached under ``~/.cache/llmcourse/kernels``, run the
k-quants' bytes as stored (memory-mapped); the legacy types' rows are regrouped 8 at a time at load
(:func:`interleave`), so that one product meets 8 rows at once (docs/gguf.md).

Instruction sets, chosen at run time (``__builtin_cpu_supports``): 2 = AVX-512 VNNI (``vpdpbusd`` on
256-bit registers), 1 = AVX2 + FMA, 0 = portable C++. ``LLMCOURSE_BLOCK_ISA=portable|avx2|vnni``
(read once per process) caps the level, so the fallbacks can be tested and timed on any machine;
:func:`block_mm` takes an explicit ``level`` too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from llmcourse.core.env import env_choice

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "blocks.cpp", HERE / "blocks_impl.h")
LEVELS = {"portable": 0, "avx2": 1, "vnni": 2}
# ggml type ids (gguf.GGMLQuantizationType) the kernels run, with (values, bytes) per block
BLOCK_TYPES: dict[int, tuple[int, int]] = {
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}
X8 = 256  # a legacy type + X8: its rows interleaved 8 at a time (:func:`interleave`)
LEGACY = (2, 3, 6, 7, 8)  # the types that interleave
BLOCK_TYPES.update({X8 + t: BLOCK_TYPES[t] for t in LEGACY})


def cache_dir() -> Path:
    """Where the compiled extension lives: ``$LLMCOURSE_CACHE/kernels`` or ``~/.cache/llmcourse/kernels``,
    one folder per source and torch version."""
    root = Path(os.environ.get("LLMCOURSE_CACHE", Path.home() / ".cache" / "llmcourse")) / "kernels"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()[:12]
    return root / f"blocks-{digest}"


@functools.cache
def load() -> bool:
    """Build (first use on this machine: ~30 s) or load the extension; True when its ops are registered.
    Failure (no compiler) is logged once and leaves the callers on their float paths."""
    if hasattr(torch.ops.llmcourse_blocks, "mm"):
        return True
    from torch.utils import cpp_extension

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="llmcourse_blocks", sources=[str(SOURCES[0])], build_directory=str(build),
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(HERE)], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler or a build failure: block weights are de-quantized instead
        log.warning("the GGUF block kernels could not be built (%s: %s)", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for ``torch.compile`` (the ops run as opaque calls inside the compiled decode step)."""

    @torch.library.register_fake("llmcourse_blocks::mm")
    def _mm(x: torch.Tensor, w: torch.Tensor, qtype: int, out_features: int, level: int,
            scale: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("llmcourse_blocks::mm_many")
    def _mm_many(x: torch.Tensor, ws: list[torch.Tensor], qtypes: list[int], out_features: list[int],
                 level: int, scales: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return [x.new_empty(x.shape[0], o) for o in out_features]

    @torch.library.register_fake("llmcourse_blocks::interleave")
    def _interleave(w: torch.Tensor, qtype: int, in_features: int, inverse: bool) -> torch.Tensor:
        return torch.empty_like(w)

    @torch.library.register_fake("llmcourse_blocks::rows")
    def _rows(w: torch.Tensor, ids: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
        return w.new_empty(ids.numel(), in_features, dtype=torch.float32)


@functools.cache
def forced_level() -> int:
    """The level ``LLMCOURSE_BLOCK_ISA`` asks for (read once), or -1 (the best this CPU has)."""
    return LEVELS.get(env_choice("LLMCOURSE_BLOCK_ISA", LEVELS, ""), -1)


def cpu_level() -> int:
    """The best level this CPU runs (2 VNNI, 1 AVX2, 0 portable)."""
    load()
    return int(torch.ops.llmcourse_blocks.level())


def row_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one stored row of ``in_features`` values."""
    values, nbytes = BLOCK_TYPES[qtype]
    return in_features // values * nbytes


def block_mm(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int, level: int | None = None) -> torch.Tensor:
    """``x Wᵀ`` for ``x`` (N, I) fp32 and ``W`` (O, I) stored as ``blocks`` (O · row_bytes) uint8 -> (N, O) fp32."""
    return torch.ops.llmcourse_blocks.mm(x, blocks, qtype, out_features, forced_level() if level is None else level)


def block_mm_many(x: torch.Tensor, blocks: list[torch.Tensor], qtypes: list[int], out_features: list[int],
                  level: int | None = None) -> list[torch.Tensor]:
    """:func:`block_mm` for several weights sharing ``x`` (q/k/v, gate/up): ``x`` quantized once, one
    parallel pass over all their output rows."""
    return torch.ops.llmcourse_blocks.mm_many(x, blocks, qtypes, out_features,
                                              forced_level() if level is None else level, [None] * len(blocks))


def block_rows(blocks: torch.Tensor, ids: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """Rows ``ids`` of ``W`` de-quantized to fp32 (K, I): an embedding lookup in a quantized table."""
    return torch.ops.llmcourse_blocks.rows(blocks, ids, qtype, in_features)


@functools.cache
def interleaving() -> bool:
    """Whether weights are repacked for the group kernels (``LLMCOURSE_BLOCK_INTERLEAVE=0`` keeps the stored
    layout; read once)."""
    return env_choice("LLMCOURSE_BLOCK_INTERLEAVE", ("1", "0", "on", "off", "true", "false", "yes", "no"),
                      "1") not in ("0", "off", "false", "no")


def interleave(blocks: torch.Tensor, qtype: int, in_features: int) -> tuple[torch.Tensor, int]:
    """``W``'s blocks (O, row bytes) repacked for the group kernels, as llama.cpp's CPU backend repacks Q4_0 at load: the same
    bytes, eight rows interleaved so that one broadcast of 4 activation codes meets all eight rows and the
    eight sums stay in the lanes of one register (no horizontal sums, scales converted 8 at a time).
    Returns ``(blocks, qtype + X8)``, or the input unchanged where that does not apply (a k-quant, rows not a
    multiple of 8, no kernels, or ``LLMCOURSE_BLOCK_INTERLEAVE=0``). Lookups (:func:`block_rows`) and every
    product accept both layouts."""
    if qtype not in LEGACY or blocks.shape[0] % 8 or in_features % 32 or not interleaving() or not load():
        return blocks, qtype
    return torch.ops.llmcourse_blocks.interleave(blocks.contiguous(), qtype, in_features, False), X8 + qtype


def deinterleave(blocks: torch.Tensor, qtype: int, in_features: int) -> tuple[torch.Tensor, int]:
    """The inverse of :func:`interleave`: blocks in ggml's stored order (for writing files, tests)."""
    if qtype < X8:
        return blocks, qtype
    return torch.ops.llmcourse_blocks.interleave(blocks.contiguous(), qtype - X8, in_features, True), qtype - X8


# --- Q8_0 blocks made in memory (the int8 and GPTQ labs' folders through the Q8_0 kernel) ---------------
def q8_0_blocks(codes: torch.Tensor) -> torch.Tensor:
    """int8 ``codes`` (O, I), I a multiple of 32, as ggml Q8_0 rows (O, I / 32 · 34) uint8: per block of 32
    codes, the fp16 scale 1.0 then the codes as they are."""
    o, i = codes.shape
    nb = i // 32
    one = torch.ones(o, nb, 1, dtype=torch.float16).view(torch.uint8)  # (O, nb, 2): fp16 1.0, little endian
    return torch.cat([one, codes.contiguous().view(torch.uint8).view(o, nb, 32)], dim=-1).view(o, nb * 34)


def q8_0_quantize(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 of a float weight (O, I), I a multiple of 32 -> (O, I / 32 · 34) uint8: per block of 32,
    ``d = fp16(max|w| / 127)``, ``q = roundf(w · (1 / d))`` (half away from zero), as ggml's reference
    quantize_row_q8_0, which llama.cpp's file quantizer runs."""
    o, i = w.shape
    wb = w.float().view(o, i // 32, 32)
    d = wb.abs().amax(-1, keepdim=True) / 127
    v = wb * torch.where(d != 0, 1 / d, torch.zeros_like(d))
    a = v.abs()
    whole = torch.floor(a)
    q = (torch.sign(v) * (whole + torch.floor(2 * (a - whole)))).clamp(-127, 127).to(torch.int8)
    head = d.to(torch.float16).view(torch.uint8)  # (O, nb, 2)
    return torch.cat([head, q.view(torch.uint8)], dim=-1).view(o, -1).contiguous()
