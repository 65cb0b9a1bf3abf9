"""Tour section of the 8-bit lab: absmax, zero-point and LLM.int8() as real int8 models.

For the default model: one table (method, bytes on disk and in memory, perplexity on the first
tokens of the eval split, KL and top-1 agreement vs fp32, greedy decode tokens/s through the
decoding lab's engine), and the notebook's plots: weight histograms original vs absmax and
original vs zero-point (two panels, per-tensor quantization of every linear weight, 150 bins),
and original vs LLM.int8().
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmcourse.core.evaluate import compare, perplexity
from llmcourse.core.modules import linear_layers, linear_weight
from llmcourse.core.report import TourContext, TourSection, html_table, pyplot, save_figure
from llmcourse.quant.int8.formulas import fake_quantize
from llmcourse.quant.int8.llm_int8 import LLMInt8Linear
from llmcourse.quant.int8.model import (
    WEIGHTS_FILE,
    Int8Config,
    linear_weight_bytes,
    model_bytes,
    quantize_model,
    save_quantized,
)

log = logging.getLogger(__name__)

FULL_METHODS = [
    Int8Config("absmax", "tensor"), Int8Config("zeropoint", "tensor"),
    Int8Config("absmax", "row"), Int8Config("zeropoint", "row"),
    Int8Config("absmax", "group", group_size=128), Int8Config("llm.int8", threshold=6.0),
]
QUICK_METHODS = [Int8Config("absmax", "row"), Int8Config("llm.int8", threshold=6.0)]


def decode_tokens_per_second(model: Any, tokenizer: Any, n_tokens: int, prompt: str = "The history of") -> float | None:
    """Greedy tokens/s of ``model`` through the decoding lab's engine (None if that lab is absent)."""
    try:
        from llmcourse.decoding import GenerationConfig, generate
    except ImportError:
        return None
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=n_tokens, eos_token_ids=())
    generate(model, tokenizer, prompt, GenerationConfig(strategy="greedy", max_new_tokens=2, eos_token_ids=()))  # warm-up
    return generate(model, tokenizer, prompt, cfg).tokens_per_second


def disk_bytes(model: Any, cfg: Int8Config, report: dict[str, Any]) -> int:
    """Size of the weights file ``quantize int8`` would write for this model."""
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, None, d, cfg, report)
        return (Path(d) / WEIGHTS_FILE).stat().st_size


def measure(lm: Any, cfg: Int8Config | None, ids: torch.Tensor, ppl_tokens: int, cmp_tokens: int,
            decode_tokens: int, write: bool = True,
            window: tuple[int, int] | None = None) -> tuple[dict[str, Any], Any]:
    """One table row for ``cfg`` (None: the fp32 reference); returns the row and the model.

    ``write=False`` skips writing the folder and reports the bytes of its tensors instead."""
    t0 = time.perf_counter()
    if cfg is None:
        model, name = lm.model, "fp32 (reference)"
        disk = sum(f.stat().st_size for f in Path(lm.path).glob("*.safetensors")) if lm.path else None
        ratio = 1.0
    else:
        model = copy.deepcopy(lm.model)
        report = quantize_model(model, cfg)
        name = cfg.name
        disk = disk_bytes(model, cfg, report) if write else model_bytes(model)
        ratio = report["int8_bytes"] / report["fp32_bytes"]
    max_length, stride = window or (min(1024, ppl_tokens), min(512, ppl_tokens // 2))
    ppl = perplexity(model, ids, max_length=max_length, stride=stride, max_tokens=ppl_tokens)
    row: dict[str, Any] = {
        "method": name, "bytes_on_disk": disk, "bytes_in_memory": model_bytes(model),
        "weights_vs_fp32": ratio, "perplexity": ppl["perplexity"],
    }
    if cfg is not None:
        c = compare(model, lm.model, ids, max_length=min(512, cmp_tokens), max_tokens=cmp_tokens)
        row["kl_vs_fp32"], row["top1_vs_fp32"] = c["kl_divergence"], c["top1_agreement"]
    else:
        row["kl_vs_fp32"], row["top1_vs_fp32"] = 0.0, 1.0
    row["decode_tok_s"] = decode_tokens_per_second(model, lm.tokenizer, decode_tokens) if decode_tokens else None
    row["seconds"] = time.perf_counter() - t0
    return row, model


def _all_linear_weights(model: Any) -> list[torch.Tensor]:
    """Every linear weight of ``model`` as (out, in), a tied head counted once."""
    seen, out = set(), []
    for _, m in linear_layers(model):
        w = linear_weight(m)
        if w.data_ptr() not in seen:
            seen.add(w.data_ptr())
            out.append(w)
    return out


def plot_histograms(model: Any, out_dir: Path, quick: bool,
                    llm_int8_model: Any | None = None) -> list[tuple[str, str]]:
    """The notebook's weight histograms (150 bins); returns (file name, ``<img>`` tag) of each."""
    plt = pyplot()
    weights = _all_linear_weights(model)
    if quick:
        weights = weights[:8]
    lo, hi = -2.0, 2.0  # the notebook's range
    amax = max(float(w.abs().max()) for w in weights)
    if amax < 1.0:  # this model's weights are much smaller than GPT-2's: zoom so the bins show them
        lo, hi = -amax, amax

    def hist(ws: list[torch.Tensor]) -> torch.Tensor:
        return sum(torch.histc(w.float(), bins=150, min=lo, max=hi) for w in ws)

    centers = torch.linspace(lo, hi, 151)[:-1] + (hi - lo) / 300
    orig = hist(weights)
    files = []
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for ax, method, color in zip(axes, ("absmax", "zeropoint"), ("tab:orange", "tab:green"), strict=True):
        quant = hist([fake_quantize(w, method, "tensor") for w in weights])
        ax.bar(centers, orig, width=(hi - lo) / 150, alpha=0.5, label="original", color="tab:blue")
        ax.bar(centers, quant, width=(hi - lo) / 150, alpha=0.5, label=f"{method} (per tensor)", color=color)
        ax.set_title(f"Original vs {method}-quantized weights")
        ax.set_ylabel("count")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("weight value")
    fig.tight_layout()
    name = "int8_hist_absmax_zeropoint.png"
    files.append((name, save_figure(fig, out_dir, name, "original vs absmax and zero-point weights", dpi=90)))
    if llm_int8_model is not None:
        seen, uniq = set(), []
        for m in llm_int8_model.modules():
            if isinstance(m, LLMInt8Linear) and m.qweight.data_ptr() not in seen:
                seen.add(m.qweight.data_ptr())
                uniq.append(m)
        uniq = [m.dequantize(torch.float32) for m in (uniq[:8] if quick else uniq)]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        ax.bar(centers, orig, width=(hi - lo) / 150, alpha=0.5, label="original", color="tab:blue")
        ax.bar(centers, hist(uniq), width=(hi - lo) / 150, alpha=0.5, label="LLM.int8() (row-wise int8)",
               color="tab:red")
        ax.set_title("Original vs LLM.int8() weights")
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = "int8_hist_llm_int8.png"
        files.append((name, save_figure(fig, out_dir, name, "original vs LLM.int8() weights", dpi=90)))
    return files


def section(ctx: TourContext) -> TourSection:
    """The 8-bit section of the tour (full mode about 90 s on 2 cores; quick mode < 20 s)."""
    lm = ctx.lm
    quick = ctx.quick
    span = ctx.span  # the tour's one evaluation span: the fp32 row equals the reference of every section
    ids, window = span.ids, (span.max_length, span.stride)
    # 64 decode tokens: long enough for the decoding lab's compiled step, for fp32 and int8 alike
    ppl_tokens, cmp_tokens, decode_tokens = (ids.shape[1], 64, 0) if quick else (ids.shape[1], 512, 64)
    methods = QUICK_METHODS if quick else FULL_METHODS
    rows, llm_model = [], None
    ref_row, _ = measure(lm, None, ids, ppl_tokens, cmp_tokens, decode_tokens, write=not quick, window=window)
    rows.append(ref_row)
    for cfg in methods:
        # decode speed only for the weight-only int8 kernels this lab makes fast (and fp32)
        fast = cfg.method != "llm.int8" and cfg.granularity != "group"
        row, model = measure(lm, cfg, ids, ppl_tokens, cmp_tokens, decode_tokens if fast else 0, write=not quick,
                             window=window)
        rows.append(row)
        if cfg.method == "llm.int8":
            llm_model = model
        else:
            del model
    linear_ratio = None
    if llm_model is not None:
        linear_ratio = linear_weight_bytes(llm_model)["bytes"] / linear_weight_bytes(lm.model)["bytes"]
    files = plot_histograms(lm.model, ctx.out_dir, quick, llm_model)
    shown = []
    for r in rows:
        shown.append({
            "method": r["method"],
            "disk MB": "" if r["bytes_on_disk"] is None else round(r["bytes_on_disk"] / 1e6, 1),
            "memory MB": round(r["bytes_in_memory"] / 1e6, 1),
            "weights / fp32": round(r["weights_vs_fp32"], 4),
            "perplexity": r["perplexity"],
            "vs fp32": f"{100 * (r['perplexity'] / ref_row['perplexity'] - 1):+.2f}%",
            "KL vs fp32": r["kl_vs_fp32"], "top-1 vs fp32": r["top1_vs_fp32"],
            "decode tok/s": "—" if r["decode_tok_s"] is None else round(r["decode_tok_s"], 1),
        })
    text = [
        "<p>Notebook 5 replaces every GPT-2 weight by its de-quantized value, so nothing gets smaller. Here each "
        "linear layer (and the input embedding, which the tied output head shares) <em>stores</em> int8 codes and "
        "fp32 scales; <code>llmcourse quantize int8</code> writes them as safetensors and the folder reloads with "
        "<code>--model DIR</code>.</p>",
        html_table(shown),
        f"<p class=\"muted\">Perplexity on {span.caption}, as every section of the tour (run "
        f"<code>llmcourse eval perplexity --model DIR</code> for all ~13.6k tokens); KL(P_fp32 || P) "
        f"and top-1 agreement on the first {cmp_tokens} tokens; decode: greedy, {decode_tokens or 'no'} tokens through "
        "the decoding lab's engine, one run (noisy on a shared CPU; see bench/int8.py for medians). "
        + ("Quick mode: 'disk MB' is the bytes of the tensors (no folder written). " if quick else "")
        + "Memory counts every tensor once; 'weights / fp32' is the bytes of the quantized weights (codes + "
        "scales) over their fp32 bytes.</p>",
    ]
    text += [tag for _, tag in files]
    summary = {"rows": rows, "perplexity_tokens": ppl_tokens, "compare_tokens": cmp_tokens,
               "llm_int8_linear_weight_ratio": linear_ratio, "images": [f for f, _ in files]}
    return TourSection("8-bit quantization: absmax, zero-point, LLM.int8()", "\n".join(text), summary)
