"""GPTQ on a whole model, block by block, into the standard GPTQ checkpoint (and back).

Sequential quantization (the paper's section 4 / GPTQModel's loop): the calibration windows go
through the embeddings once (``core.modules.block_inputs``); then, for each decoder block,

1. the block's linear layers are split into *stages* of layers that read the same input, in call
   order (Llama: ``q,k,v`` / ``o`` / ``gate,up`` / ``down``), found by running the block once; the
   layers of a stage share one Hessian. With ``true_sequential`` each stage collects it after the
   stages before it are quantized (each pass stops once the stage's input is seen), otherwise all
   stages collect theirs from one pass of the unquantized block;
2. each layer is quantized by :class:`~llmcourse.quant.gptq.gptq.GPTQ` (or rounded to nearest)
   and replaced by a :class:`~llmcourse.quant.gptq.linear.GPTQLinear` holding its packed tensors;
3. the windows go through the quantized block, and its outputs become the next block's inputs.
   When the last stage is one layer that adds into the block's output (the residual stream:
   Llama's ``down_proj``, GPT-2's ``mlp.c_proj``; :func:`adds_linearly` checks it once per block
   class), its pass runs the whole block, keeps the layer's inputs ``x`` (fp16), and the outputs
   are finished with ``out += x ΔWᵀ`` once it is quantized: one pass through the block fewer.

Only one block's inputs (``n x seq_len x hidden``) live at a time. ``load_block`` / ``done_block``
let a caller read a block's weights just before it is quantized and free or write it after
(bench/gptq_memory.py quantizes a model from safetensors shards that way).

Per layer, the report logs the mean squared output error per token ``||(W - Q) X||² / N`` of
GPTQ and of round-to-nearest on the same inputs (from the Hessian: ``ΔW H ΔWᵀ / 2``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmcourse.core.cli_common import option
from llmcourse.core.errors import UserError
from llmcourse.core.modules import (
    BlockInput,
    block_inputs,
    decoder_blocks,
    float_decoder_blocks,
    input_hooks,
    linear_layers,
    linear_weight,
    run_block,
    set_module,
)
from llmcourse.core.progress import progress
from llmcourse.quant.gptq.gptq import GPTQ, QuantizedLayer, rtn
from llmcourse.quant.gptq.linear import GPTQLinear, half_tied_embedding
from llmcourse.quant.gptq.pack import BITS, pack_layer

log = logging.getLogger(__name__)

FORMAT = "gptq"
WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = "llmcourse.json"
QUANTIZE_CONFIG = "quantize_config.json"
LOG_FILE = "quant_log.json"
METHODS = ("gptq", "rtn")


def group_size_arg(s: str) -> int | None:
    """``--group-size``: a positive group size, or 'none' (one group per row)."""
    if s.lower() in ("none", "row"):
        return None
    try:
        return int(s)  # GPTQConfig refuses <= 0 with a one-line error
    except ValueError:
        raise UserError(f"--group-size: expected an integer or 'none', got {s!r}", "pass e.g. 128, or 'none'") from None


def number_arg(s: str) -> float:
    try:
        return float(s)  # GPTQConfig checks the range with a one-line error
    except ValueError:
        raise UserError(f"expected a number, got {s!r}", "pass e.g. 0.01") from None


# Options only `quantize gptq` has (RTN has no Hessian, no column order, no lazy batches).
GPTQ_ONLY = ("desc_act", "act_group_aware", "static_groups", "damp", "block_size", "true_sequential")


@dataclass
class GPTQConfig:
    """How to quantize; validated here, at the boundary. ``group_size=None``: one group per row.
    The fields with help text are the commands' flags (``add_config_args``): their defaults live here only."""

    bits: int = option(4, "bits per weight: 2, 3, 4 or 8. Default: %(default)s")
    group_size: int | None = option(128, "inputs per group (a last, shorter group where it does not divide a layer's "
                                    "width), or 'none' for one scale per row. Default: %(default)s",
                                    type=group_size_arg)
    sym: bool = option(True, "asymmetric grid, min and max per group (default: symmetric, zero = 2^(bits-1))",
                       flag="--asym")
    desc_act: bool = option(False, "act-order: quantize columns by decreasing Hessian diagonal (default: natural "
                            "order)")
    act_group_aware: bool = option(False, "group-aware reordering (GAR, GPTQModel's default without act-order): "
                                   "groups by their largest Hessian diagonal, columns inside each group likewise; "
                                   "g_idx stays natural (default: natural order)")
    static_groups: bool = option(False, "compute every group's grid from the original weights first (with "
                                 "--desc-act, keeps g_idx in natural order; default: off)")
    # the paper's and the notebook's; GPTQModel's default is 0.05
    damp: float = option(0.01, "dampening, a fraction of mean(diag H) added to diag H (raised x10 automatically while "
                         "the Cholesky factorisation fails; GPTQModel's default is 0.05). Default: %(default)s",
                         type=number_arg)
    block_size: int = option(128, "columns per lazy batch update. Default: %(default)s")
    true_sequential: bool = option(True, "collect all of a block's Hessians in one pass (default: stage by stage, "
                                   "q/k/v, o, gate/up, down)", flag="--no-true-sequential")
    mse: bool = option(False, "search each group's clipping range (grid 100, norm 2.4; default: min/max)")
    method: str = "gptq"  # gptq | rtn (the command, not a flag)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported", f"use one of {', '.join(map(str, BITS))}")
        if self.group_size is not None and self.group_size <= 0:
            raise UserError(f"--group-size must be >= 1 (got {self.group_size})", "pass e.g. 128, or 'none' for one "
                            "group per row")
        if not (math.isfinite(self.damp) and 0 < self.damp <= 1):
            raise UserError(f"--damp must be in (0, 1] (got {self.damp})", "use e.g. 0.01")
        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1 (got {self.block_size})", "use e.g. 128")
        if self.act_group_aware and self.desc_act:
            raise UserError("--act-group-aware and --desc-act are two column orders", "choose one of them")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")

    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-row"
        flags = "".join([" act-order" if self.desc_act else "", " GAR" if self.act_group_aware else "",
                         " static" if self.static_groups else "",
                         "" if self.sym else " asym", " mse" if self.mse else ""])
        return f"{self.method.upper()} {self.bits}-bit {g}{flags}"

    def quantize_config(self) -> dict[str, Any]:
        """``quantize_config.json`` / ``config.json["quantization_config"]`` as GPTQModel and transformers read them."""
        return {
            "quant_method": "gptq", "checkpoint_format": "gptq", "bits": self.bits,
            "group_size": self.group_size or -1, "desc_act": self.desc_act, "sym": self.sym,
            "static_groups": self.static_groups, "true_sequential": self.true_sequential,
            "damp_percent": self.damp, "mse": 2.4 if self.mse else 0.0, "lm_head": False, "pack_dtype": "int32",
            "meta": {"quantizer": ["llmcourse"], "method": self.method, "act_group_aware": self.act_group_aware},
        }


# --------------------------------------------------------------------------------------------
# Checks at the boundary
# --------------------------------------------------------------------------------------------


def check_model(model: nn.Module, cfg: GPTQConfig) -> None:
    """A one-line UserError unless every block linear can be quantized and packed with ``cfg``.

    A group size that does not divide a layer's width leaves a shorter last group (``ceil(I / g)``
    groups, as AutoGPTQ and GPTQModel do: the default model's 576-wide layers at g128 have 4.5)."""
    prefix, blocks = float_decoder_blocks(model, "GPTQ")
    for name, m in linear_layers(blocks):
        name = f"{prefix}.{name}"
        out_f, in_f = linear_weight(m).shape
        if cfg.group_size is not None and cfg.group_size > in_f:
            raise UserError(f"--group-size {cfg.group_size} is wider than the {in_f} inputs of {name}",
                            f"use a group size <= {in_f} (e.g. 32, 64 or 128), or 'none' for one group per row")
        for what, n in (("inputs", in_f), ("outputs", out_f)):
            if (n * cfg.bits) % 32:
                raise UserError(f"{name} has {n} {what}: {cfg.bits}-bit values of it do not fill 32-bit words",
                                "use a model whose widths are multiples of 32")


def check_calibration(model: nn.Module, n_tokens: int) -> None:
    """Refuse fewer calibration tokens than the widest layer input (its Hessian would be singular)."""
    _, blocks = decoder_blocks(model)
    widest = max(linear_weight(m).shape[1] for _, m in linear_layers(blocks))
    if n_tokens < widest:
        raise UserError(f"{n_tokens} calibration tokens are fewer than the {widest} inputs of the widest layer",
                        "raise --samples or --seq-len")


# --------------------------------------------------------------------------------------------
# Block by block
# --------------------------------------------------------------------------------------------


def sequential_stages(block: nn.Module, layers: dict[str, nn.Module], inp: BlockInput) -> list[list[str]]:
    """The block's linear layers in call order, grouped by the input tensor they read (one forward)."""
    order: list[tuple[str, torch.Tensor]] = []  # the inputs are held, so no address is reused meanwhile
    with input_hooks(layers, lambda n, x: order.append((n, x))), torch.no_grad():
        run_block(block, inp)
    stages: list[list[str]] = []
    seen: dict[tuple, int] = {}
    for name, x in order:
        ptr = (x.data_ptr(), tuple(x.shape))
        if any(name in s for s in stages):
            continue
        if ptr in seen:
            stages[seen[ptr]].append(name)
        else:
            seen[ptr] = len(stages)
            stages.append([name])
    rest = [n for n in layers if not any(n in s for s in stages)]
    return stages + ([rest] if rest else [])


class _StageDone(Exception):
    """Raised by the last hooked layer of a stage: the rest of the block's forward is not needed
    (the same device as core.modules.block_inputs, which stops the model at the first block)."""


def collect_hessians(block: nn.Module, groups: list[list[str]], layers: dict[str, nn.Module],
                     hessians: dict[str, GPTQ], inputs: list[BlockInput]) -> None:
    """Run ``block`` on every input and add each group's input to the Hessian its layers share
    (``hessians[group[0]]``: the layers of a group read the same tensor); each forward stops as
    soon as the first layer of every group has run."""
    firsts = {g[0]: layers[g[0]] for g in groups}
    seen: set[str] = set()

    def add(name: str, x: torch.Tensor) -> None:
        hessians[name].add_batch(x)
        seen.add(name)
        if len(seen) == len(firsts):
            raise _StageDone

    with input_hooks(firsts, add):
        for inp in inputs:
            seen.clear()
            with contextlib.suppress(_StageDone):
                run_block(block, inp)


# Inputs of the last layer kept for the output correction: fp16 (half the memory of fp32) where
# every value fits; the correction they enter is the small ``ΔW x``. Its rounding (2⁻¹¹ of ``x ΔWᵀ``) is
# passed to the next block's inputs, so the fused pass equals another pass through the block only up to
# that (with fp32 here, up to float rounding: tests/quant/gptq/test_gptq.py, fused_last_pass).
_KEEP_DTYPE = torch.float16


def collect_last(block: nn.Module, name: str, layer: nn.Module, hessian: GPTQ,
                 inputs: list[BlockInput]) -> list[torch.Tensor]:
    """The last stage's pass, when it is one layer: run the *whole* block on every input, add the
    layer's input ``x`` to its Hessian, keep ``x``, and leave the block's output (with this layer
    not yet quantized) in ``inp.hidden``. After the layer is quantized, :func:`correct_outputs`
    turns these into the quantized block's outputs without another pass through the block."""
    kept: list[torch.Tensor] = []

    def add(_name: str, x: torch.Tensor) -> None:
        hessian.add_batch(x)
        small = x.to(_KEEP_DTYPE)
        kept.append(small if torch.isfinite(small).all() else x.clone())

    with input_hooks({name: layer}, add):
        for inp in inputs:
            inp.hidden = run_block(block, inp)
    return kept


def correct_outputs(inputs: list[BlockInput], kept: list[torch.Tensor], dW: torch.Tensor) -> None:
    """``out += x ΔWᵀ`` for every window: the block's output once its last layer's weight moved by
    ``ΔW = Q - W`` (the layer's output enters the block's output linearly: the residual stream)."""
    for inp, x in zip(inputs, kept, strict=True):
        inp.hidden += (x.float() @ dW.t()).view_as(inp.hidden).to(inp.hidden.dtype)


def _set_weight(m: nn.Module, W: torch.Tensor) -> None:
    """Give an ``nn.Linear`` or a ``Conv1D`` (stored transposed) the (out, in) weight ``W``.

    The parameter gets new storage rather than being written in place: a weight mapped from a
    safetensors file stays a clean file page, which :func:`release_file_pages` can drop."""
    m.weight.data = (W if isinstance(m, nn.Linear) else W.t()).to(m.weight.dtype).contiguous()


_PAGE = 4096
MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """The private file-backed address ranges of this process (from /proc/self/maps; Linux only)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1].endswith("p") and parts[4] != "0":
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def release_file_pages(tensors: list[torch.Tensor]) -> None:
    """Hand back the memory of weights that were replaced, block by block, as the run goes.

    A model loaded from safetensors reads its weights through one private mapping of the file:
    every page a block's weights touched stays resident until the whole file is unmapped, so a
    run that reads all blocks ends holding the whole fp32 model *and* its quantized copy. For
    ``tensors`` that lie in such a mapping, the clean pages are dropped (``madvise(MADV_DONTNEED)``;
    a later read would fetch them from the file again, unchanged). Freed heap memory (the Hessians,
    the block's activations) is returned with ``malloc_trim``. Anything else is left alone.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return
    maps = _file_mappings()
    for t in tensors:  # only the pages wholly inside each tensor's own bytes
        lo = -(-t.data_ptr() // _PAGE) * _PAGE
        hi = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
        if hi > lo and any(a <= lo and hi <= b for a, b in maps):
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _quantize_layer(m: nn.Module, cfg: GPTQConfig, H: GPTQ | None) -> tuple[QuantizedLayer, dict[str, Any]]:
    W = linear_weight(m).float()
    t0 = time.perf_counter()
    baseline = rtn(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse)
    if cfg.method == "gptq":
        assert H is not None
        ql = H.quantize(W, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups, cfg.damp,
                        cfg.block_size, cfg.mse, cfg.act_group_aware)
    else:
        ql = baseline
    # The layers and blocks after this one are calibrated on its weight with the fp32 scales GPTQ chose
    # (as GPTQModel does); the checkpoint rounds the scales to fp16 when it packs them. Calibrating on
    # the fp16-rounded scales instead cost 2.4% and 1.0% perplexity at 128 x 512 on the default model
    # (two calibration seeds; docs/gptq.md, "Block by block").
    row: dict[str, Any] = {"rows": W.shape[0], "columns": W.shape[1], "seconds": time.perf_counter() - t0}
    if H is not None:
        row["rtn_error"] = H.output_error(W - baseline.dequantize())
        row["gptq_error" if cfg.method == "gptq" else "error"] = H.output_error(W - ql.dequantize())
        row["damp"] = ql.damp
    row["weight_error"] = float((W - ql.dequantize()).pow(2).mean())
    return ql, row


@torch.no_grad()
def adds_linearly(block: nn.Module, name: str, layer: nn.Module, inp: BlockInput,
                  known: dict[type, bool] | None = None) -> bool:
    """Whether ``layer``'s output enters ``block``'s output linearly (``out(W + ΔW) = out(W) + x ΔWᵀ``,
    true of a pre-norm block's last projection, which adds into the residual stream; false where a
    norm follows it), checked on one window with ``ΔW = W``; ``known`` (the caller's, one per run)
    remembers the answer per block class."""
    known = {} if known is None else known
    if type(block) in known:
        return known[type(block)]
    xs: list[torch.Tensor] = []
    with input_hooks({name: layer}, lambda _n, x: xs.append(x)):
        out0 = run_block(block, inp)
    original = layer.weight.data
    W = linear_weight(layer).detach().float()
    _set_weight(layer, 2 * W)
    try:
        out1 = run_block(block, inp)
    finally:
        layer.weight.data = original
    expected = (xs[0].float() @ W.t()).view_as(out0)
    gap = float(((out1 - out0) - expected).abs().max())
    ok = len(xs) == 1 and gap <= 1e-3 * (float(expected.abs().max()) or 1.0)
    known[type(block)] = ok
    if not ok:
        log.info("%s's last layer does not add into its output: its outputs need one more pass", type(block).__name__)
    return ok


@torch.no_grad()
def quantize_model(model: nn.Module, windows: torch.Tensor | None, cfg: GPTQConfig,
                   load_block: Callable[[int, nn.Module], None] | None = None,
                   done_block: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Quantize the linear layers of ``model``'s decoder blocks in place (they become :class:`GPTQLinear`).

    ``windows`` (n, seq_len) are the calibration token windows (RTN needs none; with them it also
    logs output errors). Returns a report with the per-layer ``layers`` log and ``seconds``.
    """
    check_model(model, cfg)
    prefix, blocks = decoder_blocks(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    t0 = time.perf_counter()
    inputs = block_inputs(model, windows) if windows is not None else None
    rows: list[dict[str, Any]] = []
    linear_out: dict[type, bool] = {}  # adds_linearly's answer per block class, for this run
    bar = progress(total=len(blocks), desc=f"{cfg.method} {cfg.bits}-bit", unit="block")
    for b, block in enumerate(blocks):
        if load_block is not None:
            load_block(b, block)
        layers = dict(linear_layers(block))
        groups = sequential_stages(block, layers, inputs[0]) if inputs is not None else [list(layers)]
        # one pass per group (true-sequential: each after the groups before it are quantized), or one
        # pass for all of them; a group's layers share one Hessian
        passes = [[g] for g in groups] if cfg.true_sequential else [groups]
        done: dict[str, dict[str, torch.Tensor]] = {}  # each layer's packed checkpoint tensors
        replaced: list[torch.Tensor] = []  # the original weights, released when the block is done
        outputs_ready = False
        for pi, pass_groups in enumerate(passes):
            hessians = ({g[0]: GPTQ(linear_weight(layers[g[0]]).shape[1]) for g in pass_groups}
                        if inputs is not None else {})
            kept: list[torch.Tensor] | None = None
            last = pass_groups[0][0]
            # the last layer of a true-sequential block, if it adds into the block's output: its pass
            # runs the whole block, whose outputs are then corrected by x ΔWᵀ (no pass after it)
            fused = (inputs is not None and cfg.true_sequential and pi == len(passes) - 1 and len(passes) > 1
                     and len(pass_groups[0]) == 1 and adds_linearly(block, last, layers[last], inputs[0], linear_out))
            if fused:
                kept = collect_last(block, last, layers[last], hessians[last], inputs)
            elif inputs is not None:
                collect_hessians(block, pass_groups, layers, hessians, inputs)
            for group in pass_groups:
                H = hessians.pop(group[0], None)
                for n in group:
                    W0 = linear_weight(layers[n]).detach().float() if fused else None
                    ql, row = _quantize_layer(layers[n], cfg, H)
                    replaced.append(linear_weight(layers[n]))
                    Wq = ql.dequantize()
                    _set_weight(layers[n], Wq)  # later stages and blocks see the quantized layer
                    bias = layers[n].bias.detach() if getattr(layers[n], "bias", None) is not None else None
                    done[n] = pack_layer(ql.codes, ql.scales, ql.zeros, ql.g_idx, cfg.bits, bias)  # int32 codes: gone
                    del ql
                    rows.append({"layer": f"{prefix}.{b}.{n}", **row})
                    if fused:
                        assert kept is not None and W0 is not None
                        correct_outputs(inputs, kept, linear_weight(layers[n]).float() - W0)
                        outputs_ready = True
                        del W0, kept
                del H
        if inputs is not None and not outputs_ready:
            for inp in inputs:
                inp.hidden = run_block(block, inp)
        for n, tensors in done.items():
            out_f, in_f = linear_weight(layers[n]).shape
            set_module(block, n, GPTQLinear(in_f, out_f, cfg.bits, tensors, dtype=dtype))
        release_file_pages(replaced)
        del replaced
        if done_block is not None:
            done_block(b, block)
        bar.update(1)
        bar.set_postfix(layers=len(rows))
    bar.close()
    return {"config": asdict(cfg), "layers": rows, "seconds": time.perf_counter() - t0,
            "calibration": None if windows is None else list(windows.shape)}


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to write: GPTQ layers as they are, every other floating tensor in fp16 (as GPTQ
    checkpoints are), the output head dropped when it is tied to the embedding."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if tied and head_name and k.startswith(head_name + "."):
            continue
        v = v.detach()
        out[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous().clone()
    return out


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, cfg: GPTQConfig,
                   report: dict[str, Any], source: str | None = None) -> None:
    """Write ``model`` (after :func:`quantize_model`) as a standard GPTQ folder plus ``llmcourse.json``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    save_file(checkpoint_state(model), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "llmcourse": FORMAT})
    qcfg = cfg.quantize_config()
    model.config.quantization_config = qcfg
    try:
        model.config.save_pretrained(out_dir)
    finally:
        del model.config.quantization_config
    (out_dir / QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / LOG_FILE).write_text(json.dumps(report, indent=2) + "\n")
    meta = {"format": FORMAT, **asdict(cfg), "source": source, "weights": WEIGHTS_FILE}
    (out_dir / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_quantized(path: str | Path, dtype: str = "fp32") -> Any:
    """Open a GPTQ folder (ours, or any "gptq" v1 checkpoint in one safetensors file) as a LoadedModel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from llmcourse.core.models import LoadedModel, resolve_dtype

    path = Path(path)
    torch_dtype = resolve_dtype(dtype)
    try:
        qcfg = json.loads((path / QUANTIZE_CONFIG).read_text())
        bits = int(qcfg["bits"])
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the GPTQ folder {path} ({type(e).__name__}: {str(e)[:120]})",
                        "re-create it with `llmcourse quantize gptq`") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors", "re-create it with `llmcourse quantize gptq`")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    replaced: set[str] = set()
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        replaced.add(name)
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise UserError(f"{path}: {name} is not in the architecture of config.json", "re-create the folder") from e
        out_f, in_f = linear_weight(old).shape
        tensors = {t: state.pop(f"{name}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")}
        if f"{name}.bias" in state:
            tensors["bias"] = state.pop(f"{name}.bias")
        if tensors["qweight"].shape != (in_f * bits // 32, out_f):
            raise UserError(f"{path}: {name}.qweight has shape {tuple(tensors['qweight'].shape)}, not "
                            f"({in_f * bits // 32}, {out_f}) for {bits} bits", "re-create the folder")
        set_module(model, name, GPTQLinear(in_f, out_f, bits, tensors, dtype=torch_dtype))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
    half = bool(tied and embed_key and torch_dtype == torch.float32 and state[embed_key].dtype == torch.float16)
    if half:  # the tied fp16 table stays fp16 (exact in fp32): half the memory, a faster decode head
        half_tied_embedding(model, state.pop(embed_key))
        replaced.add(embed_key.rpartition(".")[0])
    rest = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight")) and k.rpartition(".")[0] not in replaced]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})", "re-create the folder")
    if tied and not half:
        model.tie_weights()
    meta = {}
    if (path / MARKER_FILE).exists():
        meta = json.loads((path / MARKER_FILE).read_text())
    return LoadedModel(model, tok, str(path), path, kind="gptq", info={"quantize_config": qcfg, "llmcourse": meta})
