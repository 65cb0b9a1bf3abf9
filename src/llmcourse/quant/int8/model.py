"""8-bit weight quantization: absmax and zero-point, per tensor / row / group, as real int8 models.

Source: the course's notebook "Introduction to Weight Quantization" (M. Labonne), whose formulas
we keep, applied to a whole tensor, to each row (output channel) or to groups of ``group_size``
consecutive inputs of each row. With ``X`` one such block:

* absmax (symmetric):  ``s = 127 / max|X|``,  ``Xq = round(s X)``,  ``X' = Xq / s``.
* zero-point (asymmetric):  ``s = 255 / (max X - min X)``,  ``z = round(-s min X - 128)``,
  ``Xq = clip(round(s X + z), -128, 127)``,  ``X' = (Xq - z) / s``.
  Worked example: max 3.2, min -3.0 gives ``s = 41.13``, ``z = -5``; 0.1 maps to
  ``round(4.11 - 5) = -1`` and back to ``(-1 + 5) / 41.13 = 0.097``.

Rounding is ``torch.round``: to nearest, ties to even (the notebook uses the same function).
Neither scheme clips a value of its own block (except a tie at exactly 127.5, which lands on
127), so the round trip is bounded element-wise by ``|X - X'| <= 1 / (2 s)``.

Guards: a block whose absmax is 0 (or so small that ``127 / max|X|`` overflows) gets ``s = 1``
and all-zero codes; a block with ``max == min`` gets the notebook's range of 1, which still
returns the constant within ``1 / (2 s)``.

Unlike the notebook, which writes the de-quantized values back into fp32 tensors (so nothing
gets smaller), :func:`quantize_model` swaps every ``nn.Linear`` (and GPT-2's ``Conv1D``) and the
input embedding for modules that *store* the int8 codes and scales
(:mod:`llmcourse.quant.int8.linear`, or :mod:`llmcourse.quant.int8.llm_int8` for LLM.int8());
:func:`save_quantized` writes them as safetensors with ``llmcourse.json`` naming the scheme, and
:func:`load_quantized` (called by ``core.models.load_model`` for such folders) reads them back.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmcourse.core.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("absmax", "zeropoint", "llm.int8")
GRANULARITIES = ("tensor", "row", "group")
FORMAT = "int8"
WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "llmcourse.json"


# --------------------------------------------------------------------------------------------
# The formulas, on blocks of a 2-D view of the tensor
# --------------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``x`` as fp32 blocks over which one scale is taken: (1, 1, n), (rows, 1, cols) or (rows, G, g).

    A ragged last group is padded by repeating the row's last value, which changes neither
    its max nor its min.
    """
    x2 = x.detach().float().reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().float().reshape(1, -1)
    if granularity == "tensor":
        return x2.reshape(1, 1, -1)
    if granularity == "row":
        return x2.unsqueeze(1)
    assert group_size is not None and group_size >= 1
    cols = x2.shape[1]
    n_groups = math.ceil(cols / group_size)
    pad = n_groups * group_size - cols
    if pad:
        x2 = torch.cat([x2, x2[:, -1:].expand(-1, pad)], dim=1)
    return x2.reshape(x2.shape[0], n_groups, group_size)


def expand_stat(stat: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """A (rows, G) per-group statistic repeated over its columns: (rows, cols). Row / tensor
    statistics of shape (rows, 1) / (1, 1) are returned as they are (they broadcast)."""
    if stat.shape[1] == 1:
        return stat
    assert group_size is not None
    return stat.repeat_interleave(group_size, dim=1)[:, :cols]


def absmax_scale(blocks: torch.Tensor) -> torch.Tensor:
    """``s = 127 / max|X|`` per block (last dim), guarded: 1 where that is not finite."""
    s = 127.0 / blocks.abs().amax(dim=-1)
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def zeropoint_params(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = 255 / (max - min)`` (range 1 for constant blocks, as the notebook) and ``z = round(-s min - 128)``."""
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    rng = hi - lo
    s = 255.0 / torch.where(rng > 0, rng, torch.ones_like(rng))
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, 255.0))
    z = torch.round(-s * lo - 128.0)
    return s, z


@dataclass
class QuantizedTensor:
    """int8 codes of a tensor with their scales (and zero-points for the zero-point scheme).

    ``q`` has the tensor's shape viewed as 2-D (rows, cols); ``scale`` (and ``zero``) are fp32 of
    shape (1, 1) per tensor, (rows, 1) per row or (rows, ceil(cols / group_size)) per group.
    De-quantization: ``(q - zero) / scale`` with the statistic of each element's block.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    granularity: str
    group_size: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``X' = (Xq - z) / s`` (absmax: ``Xq / s``), in ``dtype``, shape (rows, cols)."""
        cols = self.q.shape[1]
        w = self.q.float()
        if self.zero is not None:
            w = w - expand_stat(self.zero, cols, self.group_size)
        return (w / expand_stat(self.scale, cols, self.group_size)).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes plus their statistics."""
        n = self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n


def absmax_quantize(x: torch.Tensor, granularity: str = "tensor", group_size: int | None = None) -> QuantizedTensor:
    """Absmax (symmetric) int8: ``s = 127 / max|X|``, ``Xq = round(s X)`` per block."""
    _check_granularity(granularity, group_size)
    b = _blocks(x, granularity, group_size)
    s = absmax_scale(b)  # (rows, G)
    q = torch.round(b * s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    q = q.reshape(b.shape[0], -1)[:, : _cols(x)] if granularity != "tensor" else q.reshape(_rows(x), -1)
    return QuantizedTensor(q.contiguous(), s.contiguous(), None, granularity, group_size)


def zeropoint_quantize(x: torch.Tensor, granularity: str = "tensor", group_size: int | None = None) -> QuantizedTensor:
    """Zero-point (asymmetric) int8: ``Xq = clip(round(s X + z), -128, 127)`` per block."""
    _check_granularity(granularity, group_size)
    b = _blocks(x, granularity, group_size)
    s, z = zeropoint_params(b)
    q = torch.round(b * s.unsqueeze(-1) + z.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    q = q.reshape(b.shape[0], -1)[:, : _cols(x)] if granularity != "tensor" else q.reshape(_rows(x), -1)
    return QuantizedTensor(q.contiguous(), s.contiguous(), z.contiguous(), granularity, group_size)


def quantize_tensor(x: torch.Tensor, method: str, granularity: str = "row", group_size: int | None = None) -> QuantizedTensor:
    """Quantize ``x`` with ``method`` (absmax | zeropoint; llm.int8 stores absmax per row)."""
    if method == "zeropoint":
        return zeropoint_quantize(x, granularity, group_size)
    if method in ("absmax", "llm.int8"):
        return absmax_quantize(x, granularity, group_size)
    raise UserError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")


def fake_quantize(x: torch.Tensor, method: str, granularity: str = "tensor", group_size: int | None = None) -> torch.Tensor:
    """The notebook's operation: ``x`` replaced by its de-quantized value, same shape and dtype."""
    return quantize_tensor(x, method, granularity, group_size).dequantize(x.dtype).reshape(x.shape)


def _rows(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


def _cols(x: torch.Tensor) -> int:
    return x.numel() // _rows(x)


def _check_granularity(granularity: str, group_size: int | None) -> None:
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    if granularity == "group" and (group_size is None or group_size < 1):
        raise UserError(f"group granularity needs a group size >= 1 (got {group_size})", "pass --group-size, e.g. 128")


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------


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
        _check_granularity(self.granularity, self.group_size)
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


def _is_linear(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")  # GPT-2's transposed linear


def _linear_weight(m: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (stored (in, out))."""
    return m.weight.detach() if isinstance(m, nn.Linear) else m.weight.detach().t()


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _make_linear(cfg: Int8Config, qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    if cfg.method == "llm.int8":
        from llmcourse.quant.int8.llm_int8 import LLMInt8Linear

        return LLMInt8Linear(qt, bias, threshold=cfg.threshold, dtype=dtype)
    from llmcourse.quant.int8.linear import Int8Linear

    return Int8Linear(qt, bias, dtype=dtype)


def _tied_head(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of (input embedding, output head) when they share one weight tensor."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None or not hasattr(emb, "weight") or not hasattr(head, "weight"):
        return None, None
    if emb.weight.data_ptr() != head.weight.data_ptr():
        return None, None
    names = {id(m): n for n, m in model.named_modules()}
    return names.get(id(emb)), names.get(id(head))


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: Int8Config) -> dict[str, Any]:
    """Swap ``model``'s linear layers (and input embedding) for int8 modules, in place.

    Returns a report: ``modules`` (name -> kind, for reloading), ``tied`` (embedding and head
    sharing one int8 tensor), ``fp32_bytes`` and ``int8_bytes`` of the replaced weights and
    ``errors`` (per module mean |W - W'| / mean |W|).
    """
    from llmcourse.quant.int8.linear import Int8Embedding

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    emb_name, head_name = _tied_head(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    report: dict[str, Any] = {"modules": {}, "tied": None, "fp32_bytes": 0, "int8_bytes": 0, "errors": {}}

    def record(name: str, w: torch.Tensor, qt: QuantizedTensor) -> None:
        report["fp32_bytes"] += w.numel() * 4
        report["int8_bytes"] += qt.nbytes
        err = (qt.dequantize() - w.float()).abs().mean() / w.float().abs().mean().clamp_min(1e-30)
        report["errors"][name] = float(err)

    emb_qt = None
    if cfg.embeddings and isinstance(emb, nn.Embedding) and emb_name and not _skipped(emb_name, cfg.skip):
        # The embedding is looked up by rows (tokens): row / group statistics work for it as they are.
        emb_method = "absmax" if cfg.method == "llm.int8" else cfg.method
        emb_qt = quantize_tensor(emb.weight, emb_method, cfg.granularity, cfg.gsize)
        record(emb_name, emb.weight, emb_qt)
        _set_module(model, emb_name, Int8Embedding(emb_qt, padding_idx=emb.padding_idx, dtype=dtype))
        report["modules"][emb_name] = "embedding"

    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name_any = next((n for n, m in model.named_modules() if m is head_mod), None)
    linears = [(n, m) for n, m in model.named_modules() if _is_linear(m) and not _skipped(n, cfg.skip)]
    for name, m in linears:
        w = _linear_weight(m)
        if name == head_name and emb_qt is not None:
            qt = emb_qt  # tied: one int8 tensor serves the lookup and the output projection
            report["tied"] = [emb_name, head_name]
        else:
            qt = quantize_tensor(w, cfg.method, cfg.granularity, cfg.gsize)
            record(name, w, qt)
        bias = m.bias.detach().to(dtype) if getattr(m, "bias", None) is not None else None
        if cfg.method == "llm.int8" and name == head_name_any:
            # As transformers + bitsandbytes keep the output head out of the int8 matmul, its
            # activations stay in floating point; its weight is stored int8 (weight-only).
            from llmcourse.quant.int8.linear import Int8Linear

            _set_module(model, name, Int8Linear(qt, bias, dtype=dtype))
            report["modules"][name] = "weight_only"
            continue
        _set_module(model, name, _make_linear(cfg, qt, bias, dtype))
        report["modules"][name] = "conv1d" if not isinstance(m, nn.Linear) else "linear"
    if not report["modules"]:
        raise UserError("the model has no linear layers to quantize", "check --skip and the model architecture")
    log.info("quantized %d modules (%s)", len(report["modules"]), cfg.name)
    return report


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the linear / embedding weights of ``model`` (quantized or not), counted once each."""
    from llmcourse.quant.int8.linear import Int8Embedding, Int8Linear
    from llmcourse.quant.int8.llm_int8 import LLMInt8Linear

    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear | LLMInt8Linear | Int8Embedding):
            tensors = [m.qweight, m.scale] + ([m.zero] if getattr(m, "zero", None) is not None else [])
        elif _is_linear(m) or isinstance(m, nn.Embedding):
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
    stored once, under the embedding's name. No pickle is written.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = model.state_dict()
    if report.get("tied"):
        _, head = report["tied"]
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    state = {k: v.detach().contiguous().clone() if _shares(v, state, k) else v.detach().contiguous()
             for k, v in state.items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "llmcourse": FORMAT})
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"format": FORMAT, **asdict(cfg), "modules": report["modules"], "tied": report["tied"],
            "source": source, "dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point())
                                             ).replace("torch.", "")}
    (out_dir / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _shares(v: torch.Tensor, state: dict[str, torch.Tensor], key: str) -> bool:
    """Whether another entry of ``state`` views the same memory (safetensors refuses that)."""
    return any(k != key and t.data_ptr() == v.data_ptr() for k, t in state.items())


def load_quantized(path: str | Path, dtype: str = "fp32") -> Any:
    """Rebuild a folder written by :func:`save_quantized` as a :class:`~llmcourse.core.models.LoadedModel`.

    The architecture is built from ``config.json`` (without random initialisation), each module
    named in ``llmcourse.json`` is replaced by its int8 module holding the stored tensors, and the
    remaining tensors are loaded strictly.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from llmcourse.core.models import DTYPES, LoadedModel
    from llmcourse.quant.int8.linear import Int8Embedding, Int8Linear

    path = Path(path)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    try:
        meta = json.loads((path / MARKER_FILE).read_text())
        cfg = Int8Config(**{k: meta[k] for k in ("method", "granularity", "group_size", "threshold", "skip",
                                                 "embeddings")})
        modules: dict[str, str] = meta["modules"]
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
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()

    def take(name: str) -> QuantizedTensor:
        try:
            q, s = state.pop(f"{name}.qweight"), state.pop(f"{name}.scale")
        except KeyError as e:
            raise UserError(f"{path / WEIGHTS_FILE} lacks the int8 tensors of {name}", "re-create the folder") from e
        z = state.pop(f"{name}.zero", None)
        if q.dtype != torch.int8:
            raise UserError(f"{name}.qweight in {path} is {q.dtype}, not int8", "re-create the folder")
        return QuantizedTensor(q, s.float(), None if z is None else z.float(), cfg.granularity, cfg.gsize)

    shared: QuantizedTensor | None = None
    for name, kind in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise UserError(f"{path}: module {name} is not in the architecture of config.json", "re-create the folder") from e
        if kind == "embedding":
            qt = take(name)
            shared = qt
            _set_module(model, name, Int8Embedding(qt, padding_idx=getattr(old, "padding_idx", None), dtype=torch_dtype))
            continue
        qt = shared if tied and name == tied[1] and shared is not None else take(name)
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.to(torch_dtype)
        if kind == "weight_only":
            _set_module(model, name, Int8Linear(qt, bias, dtype=torch_dtype))
        else:
            _set_module(model, name, _make_linear(cfg, qt, bias, torch_dtype))
    rest = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quant_keys = ("qweight", "scale", "zero", "bias")
    missing = [k for k in missing if not (k.rsplit(".", 1)[0] in modules and k.rsplit(".", 1)[1] in quant_keys)]
    if missing or unexpected:
        raise UserError(f"{path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        "re-create the folder with `llmcourse quantize int8`")
    info = {"int8": {k: meta[k] for k in ("method", "granularity", "group_size", "threshold") if k in meta}}
    return LoadedModel(model, tok, str(path), path, kind="int8", info=info)
