"""Whole models in 8 bits: the quantized state dict, the swap to runtime modules, folders, the way back.

Unlike the course notebook ("Introduction to Weight Quantization"), which writes the de-quantized
values back into fp32 tensors (so nothing gets smaller), the model *stores* int8 codes. As in
gpt-fast's ``quantize.py``, quantizing is two steps:

1. :func:`quantized_state_dict` (pure: the model is only read) applies the formulas of
   :mod:`llmcourse.quant.int8.formulas` to every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``,
   as :func:`llmcourse.core.modules.linear_layers` finds them) and to the input embedding. Each
   quantized module ``NAME`` becomes ``NAME.qweight`` (int8 (out, in)), ``NAME.scale`` (fp32),
   ``NAME.zero`` (zero-point only) and ``NAME.bias``; every other tensor is the model's own; a
   tied output head has no entries (it shares the embedding's codes). A report names each
   module's kind (``embedding``, ``linear``, ``conv1d``, ``weight_only``).
2. :func:`swap_modules` replaces those modules by the runtime modules of
   :mod:`llmcourse.quant.int8.linear` (``Int8Linear``, ``Int8Embedding``) or
   :mod:`llmcourse.quant.int8.llm_int8` (``LLMInt8Linear``) holding the tensors of such a state dict.

:func:`quantize_model` runs both, in place. :func:`save_quantized` writes the state dict as
safetensors with ``llmcourse.json`` naming the scheme; :func:`load_quantized` (which
``core.models.load_model`` calls for such folders, through the lab table) builds the architecture
from ``config.json`` and runs step 2 on the file's tensors. :func:`dequantize_model` goes back to
plain ``nn.Linear`` / ``nn.Embedding`` modules holding ``W' = (q - z) / s`` (``convert hf``).

The folder's ``config.json`` carries a ``quantization_config`` without ``quant_method``
(:data:`HF_GUARD`), so plain transformers ``from_pretrained`` raises instead of loading a model
whose weights are missing: with an unknown ``quant_method``, transformers 5 only warns and
initialises those weights at random.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from llmcourse.core.errors import UserError
from llmcourse.core.models import LoadedModel, resolve_dtype
from llmcourse.core.modules import (
    is_linear,
    linear_layers,
    linear_weight,
    matches,
    module_name,
    output_head,
    set_module,
    tied_embeddings,
)
from llmcourse.quant.int8.formulas import (
    GRANULARITIES,
    METHODS,
    QuantizedTensor,
    check_granularity,
    quantize_tensor,
)
from llmcourse.quant.int8.linear import Int8Embedding, Int8Linear, RowKernels
from llmcourse.quant.int8.llm_int8 import LLMInt8Linear

log = logging.getLogger(__name__)

__all__ = ["GRANULARITIES", "METHODS", "Int8Config", "quantized_state_dict", "swap_modules", "quantize_model",
           "quantize_llm_int8", "dequantize_model", "linear_weight_bytes", "model_bytes", "save_quantized",
           "load_quantized"]

FORMAT = "int8"
WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "llmcourse.json"
QUANT_KEYS = ("qweight", "scale", "zero")  # a quantized module's tensors, beside its optional bias

# Written as config.json's quantization_config. No quant_method: transformers' from_pretrained raises
# "... has no `quant_method` attribute" (tested); an unknown quant_method would only be warned about.
HF_GUARD: dict[str, Any] = {
    "quant_method": None,
    "llmcourse": FORMAT,
    "note": "int8 codes and scales written by `llmcourse quantize int8`, which transformers cannot load. "
            "Use `llmcourse ... --model DIR`, or `llmcourse convert hf --model DIR --out HF_DIR` for a plain folder.",
}


@dataclass
class Int8Config:
    """How to quantize a model; validated here, at the boundary."""

    method: str = "absmax"  # absmax | zeropoint | llm.int8
    granularity: str = "row"  # tensor | row | group (llm.int8: row, i.e. vector-wise)
    group_size: int = 128  # inputs per group (a ragged last group is allowed)
    threshold: float = 6.0  # llm.int8: |x| >= threshold marks an outlier feature column
    skip: list[str] = field(default_factory=list)  # module names (or name suffixes) kept in full precision
    embeddings: bool = True  # also store the input embedding in int8 (shared with a tied lm_head)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}", f"use --method {' | '.join(METHODS)}")
        check_granularity(self.granularity, self.group_size)
        if self.method == "llm.int8" and self.granularity != "row":
            raise UserError(f"LLM.int8() is vector-wise (one scale per row), not --granularity {self.granularity}",
                            "drop --granularity or pass --granularity row")
        if self.method == "llm.int8" and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise UserError(f"--threshold must be a finite number >= 0 (got {self.threshold})", "e.g. --threshold 6.0")

    @property
    def gsize(self) -> int | None:
        return self.group_size if self.granularity == "group" else None

    @property
    def name(self) -> str:
        if self.method == "llm.int8":
            return f"llm.int8 (threshold {self.threshold:g})"
        g = f" {self.group_size}" if self.granularity == "group" else ""
        return f"{self.method} per {self.granularity}{g}"


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------------------------
# Step 1: the quantized state dict (pure)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def quantized_state_dict(model: nn.Module, cfg: Int8Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of ``model`` quantized with ``cfg``, and a report; ``model`` is not changed.

    Quantized modules hold ``NAME.qweight`` / ``NAME.scale`` / ``NAME.zero`` (and ``NAME.bias`` in
    the model's dtype); other entries are the model's own tensors (not copies); a tied head has no
    entries. The report: ``modules`` (name -> kind, what :func:`swap_modules` builds), ``tied``
    ([embedding, head] sharing one int8 tensor, or None), ``fp32_bytes`` / ``int8_bytes`` of the
    replaced weights and ``errors`` (per module mean |W - W'| / mean |W|).
    """
    dtype = _float_dtype(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_name = module_name(model, emb) if isinstance(emb, nn.Embedding) else None
    tied_emb, tied_head = tied_embeddings(model)
    head_name, _ = output_head(model)
    quantized: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"modules": {}, "tied": None, "fp32_bytes": 0, "int8_bytes": 0, "errors": {}}

    def put(name: str, w: torch.Tensor, qt: QuantizedTensor) -> None:
        quantized[f"{name}.qweight"], quantized[f"{name}.scale"] = qt.q, qt.scale
        if qt.zero is not None:
            quantized[f"{name}.zero"] = qt.zero
        report["fp32_bytes"] += w.numel() * 4
        report["int8_bytes"] += qt.nbytes
        err = (qt.dequantize() - w.float()).abs().mean() / w.float().abs().mean().clamp_min(1e-30)
        report["errors"][name] = float(err)

    if cfg.embeddings and emb_name and not matches(emb_name, cfg.skip):
        # The embedding is looked up by rows (tokens): row / group statistics work for it as they are.
        emb_method = "absmax" if cfg.method == "llm.int8" else cfg.method
        put(emb_name, emb.weight, quantize_tensor(emb.weight, emb_method, cfg.granularity, cfg.gsize))
        report["modules"][emb_name] = "embedding"

    for name, m in linear_layers(model, cfg.skip):
        if name == tied_head and tied_emb in report["modules"]:
            report["tied"] = [tied_emb, name]  # one int8 tensor serves the lookup and the output projection
        else:
            w = linear_weight(m)
            put(name, w, quantize_tensor(w, cfg.method, cfg.granularity, cfg.gsize))
        if getattr(m, "bias", None) is not None:
            quantized[f"{name}.bias"] = m.bias.detach().to(dtype)
        if cfg.method == "llm.int8" and name == head_name:
            # As transformers + bitsandbytes keep the output head out of the int8 matmul, its
            # activations stay in floating point; its weight is stored int8 (weight-only).
            report["modules"][name] = "weight_only"
        else:
            report["modules"][name] = "linear" if isinstance(m, nn.Linear) else "conv1d"
    if not report["modules"]:
        raise UserError("the model has no linear layers to quantize", "check --skip and the model architecture")
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in report["modules"]}
    state.update(quantized)
    return state, report


# --------------------------------------------------------------------------------------------
# Step 2: swap modules for runtime
# --------------------------------------------------------------------------------------------


def runtime_module(kind: str, qt: QuantizedTensor, bias: torch.Tensor | None, cfg: Int8Config,
                   dtype: torch.dtype, padding_idx: int | None = None,
                   kernels: RowKernels | None = None) -> nn.Module:
    """The runtime module for one quantized module of kind ``kind`` (see :func:`quantized_state_dict`);
    weight-only linears share ``kernels``, their model's compiled row-wise kernels."""
    if kind == "embedding":
        return Int8Embedding(qt, padding_idx=padding_idx, dtype=dtype)
    if cfg.method == "llm.int8" and kind != "weight_only":
        mod: nn.Module = LLMInt8Linear(qt, bias, threshold=cfg.threshold, dtype=dtype)
    else:
        mod = Int8Linear(qt, bias, dtype=dtype, kernels=kernels)
    mod.conv1d = kind == "conv1d"
    return mod


def swap_modules(model: nn.Module, state: dict[str, torch.Tensor], modules: dict[str, str], cfg: Int8Config,
                 tied: list[str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Replace each module named in ``modules`` (name -> kind) by its runtime module holding the
    tensors of ``state`` (a :func:`quantized_state_dict`), in place. A tied head (``tied[1]``) gets
    the embedding's very tensors. Raises KeyError if ``state`` lacks a module's codes or scales."""
    dtype = dtype or _float_dtype(model)
    kernels = RowKernels()  # one compiled kernel per weight shape, shared by this model's modules
    for name, kind in modules.items():
        src = tied[0] if tied and name == tied[1] else name
        zero = state.get(f"{src}.zero")
        qt = QuantizedTensor(state[f"{src}.qweight"], state[f"{src}.scale"].float(),
                             None if zero is None else zero.float(), cfg.granularity, cfg.gsize)
        bias = state.get(f"{name}.bias")
        bias = None if bias is None else bias.to(dtype)
        old = model.get_submodule(name)
        set_module(model, name, runtime_module(kind, qt, bias, cfg, dtype, getattr(old, "padding_idx", None),
                                               kernels))


def quantize_model(model: nn.Module, cfg: Int8Config) -> dict[str, Any]:
    """Swap ``model``'s linear layers (and input embedding) for int8 modules, in place: the two steps
    :func:`quantized_state_dict` then :func:`swap_modules`. Returns the report of the first."""
    dtype = _float_dtype(model)
    state, report = quantized_state_dict(model, cfg)
    swap_modules(model, state, report["modules"], cfg, report["tied"], dtype)
    log.info("quantized %d modules (%s)", len(report["modules"]), cfg.name)
    return report


def quantize_llm_int8(model: nn.Module, threshold: float = 6.0, skip: list[str] | None = None) -> dict[str, Any]:
    """Swap every linear layer of an HF causal LM for :class:`LLMInt8Linear`, in place.

    The input embedding is stored as absmax-per-row int8 too (shared with a tied head). Returns
    the report of :func:`quantize_model`.
    """
    return quantize_model(model, Int8Config(method="llm.int8", granularity="row", threshold=threshold,
                                            skip=list(skip or [])))


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every int8 module of ``model`` by a plain one holding its de-quantized weight
    ``W' = (q - z) / s``, in place, and return ``model``: ``nn.Embedding`` for an
    :class:`Int8Embedding`, ``nn.Linear`` (GPT-2's ``Conv1D`` where it replaced one) for an
    :class:`Int8Linear` or :class:`LLMInt8Linear`, in each module's compute dtype. Modules that
    shared int8 codes (a tied embedding and head) share one weight afterwards.

    The result is an ordinary transformers model (``save_pretrained`` writes a plain folder); it
    computes what the weight-only modules computed, up to float rounding (LLM.int8() also rounded
    the activations, which a plain model does not).
    """
    from transformers.pytorch_utils import Conv1D

    weights: dict[int, nn.Parameter] = {}  # data_ptr of the int8 codes -> its de-quantized weight

    def weight(m: nn.Module, table: bool) -> nn.Parameter:
        key = m.qweight.data_ptr()
        if key not in weights:
            w = m.weight if table else m.dequantize()  # (rows, cols) either way
            weights[key] = nn.Parameter(w.detach().contiguous())
        return weights[key]

    def bias(m: nn.Module) -> nn.Parameter | None:
        return None if m.bias is None else nn.Parameter(m.bias.detach().to(m.compute_dtype).clone())

    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Embedding):
            new: nn.Module = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx,
                                          device="meta")
            new.weight = weight(m, table=True)
        elif isinstance(m, Int8Linear | LLMInt8Linear) and m.conv1d:
            new = Conv1D(m.out_features, m.in_features)
            new.weight = nn.Parameter(m.dequantize().t().contiguous())  # Conv1D stores (in, out)
            b = bias(m)
            new.bias = b if b is not None else nn.Parameter(torch.zeros(m.out_features, dtype=m.compute_dtype))
        elif isinstance(m, Int8Linear | LLMInt8Linear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.weight = weight(m, table=False)
            if m.bias is not None:
                new.bias = bias(m)
        else:
            continue
        set_module(model, name, new)
    return model


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the linear / embedding weights of ``model`` (quantized or not), counted once each."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear | LLMInt8Linear | Int8Embedding):
            tensors = [m.qweight, m.scale] + ([m.zero] if getattr(m, "zero", None) is not None else [])
        elif is_linear(m) or isinstance(m, nn.Embedding):
            tensors = [m.weight]
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return {"bytes": total}


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Folders: safetensors + config + tokenizer + llmcourse.json
# --------------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, cfg: Int8Config,
                   report: dict[str, Any], source: str = "") -> None:
    """Write a quantized ``model`` into ``out_dir`` (an existing, empty, temporary folder).

    ``model.safetensors`` holds the int8 codes (``NAME.qweight``), scales (``NAME.scale``),
    zero-points (``NAME.zero``) and every other tensor in the model's dtype; a tied head is
    stored once, under the embedding's name. No pickle is written. ``config.json`` gets
    :data:`HF_GUARD` as its ``quantization_config``.
    """
    out_dir = Path(out_dir)
    state = model.state_dict()
    if report.get("tied"):
        _, head = report["tied"]
        state = {k: v for k, v in state.items() if not _is_quant_key(k, head)}
    state = {k: v.detach().contiguous().clone() if _shares(v, state, k) else v.detach().contiguous()
             for k, v in state.items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "llmcourse": FORMAT})
    model.config.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = HF_GUARD
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"format": FORMAT, **asdict(cfg), "modules": report["modules"], "tied": report["tied"],
            "source": source, "dtype": str(_float_dtype(model)).replace("torch.", "")}
    (out_dir / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _is_quant_key(key: str, module: str) -> bool:
    """Whether ``key`` is one of ``module``'s int8 tensors (codes, scale, zero-point)."""
    owner, _, leaf = key.rpartition(".")
    return owner == module and leaf in QUANT_KEYS


def _shares(v: torch.Tensor, state: dict[str, torch.Tensor], key: str) -> bool:
    """Whether another entry of ``state`` views the same memory (safetensors refuses that)."""
    return any(k != key and t.data_ptr() == v.data_ptr() for k, t in state.items())


def load_quantized(path: str | Path, dtype: str = "fp32") -> LoadedModel:
    """Rebuild a folder written by :func:`save_quantized` as a :class:`~llmcourse.core.models.LoadedModel`.

    The architecture is built from ``config.json`` (without random initialisation, its
    ``quantization_config`` guard dropped), :func:`swap_modules` puts the int8 modules named in
    ``llmcourse.json`` in place with the stored tensors, and the remaining tensors are loaded
    strictly. ``info["dequantize"]`` is a callable returning a plain de-quantized copy of the
    model (:func:`dequantize_model`), for commands that write other formats.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    torch_dtype = resolve_dtype(dtype)
    try:
        meta = json.loads((path / MARKER_FILE).read_text())
        cfg = Int8Config(**{k: meta[k] for k in ("method", "granularity", "group_size", "threshold", "skip",
                                                 "embeddings")})
        modules: dict[str, str] = dict(meta["modules"])
        tied = meta.get("tied")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / MARKER_FILE} is not a valid int8 description ({type(e).__name__}: {e})",
                        "re-create the folder with `llmcourse quantize int8`") from e
    if not (path / WEIGHTS_FILE).exists():
        raise UserError(f"{path} has no {WEIGHTS_FILE}", "re-create the folder with `llmcourse quantize int8`")
    state = load_file(str(path / WEIGHTS_FILE))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the config / tokenizer of {path} ({type(e).__name__})",
                        "check that the folder is complete") from e
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # our guard against plain transformers; the model is built here
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()

    for name in modules:
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise UserError(f"{path}: module {name} is not in the architecture of config.json",
                            "re-create the folder") from e
        if tied and name == tied[1]:
            continue
        q = state.get(f"{name}.qweight")
        if q is None or f"{name}.scale" not in state:
            raise UserError(f"{path / WEIGHTS_FILE} lacks the int8 tensors of {name}", "re-create the folder")
        if q.dtype != torch.int8:
            raise UserError(f"{name}.qweight in {path} is {q.dtype}, not int8", "re-create the folder")
    swap_modules(model, state, modules, cfg, tied, torch_dtype)
    rest = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()
            if k.rpartition(".")[0] not in modules}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in modules]
    if missing or unexpected:
        raise UserError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        "re-create the folder with `llmcourse quantize int8`")
    info = {"int8": {k: meta[k] for k in ("method", "granularity", "group_size", "threshold") if k in meta},
            "dequantize": lambda: dequantize_model(copy.deepcopy(model))}
    return LoadedModel(model, tok, str(path), path, kind="int8", info=info)
