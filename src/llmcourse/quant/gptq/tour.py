"""Tour section of the GPTQ lab: per-layer output error GPTQ vs round-to-nearest, and (full mode) the
default model at 4-bit g128 — perplexity, KL and top-1 vs fp32, bytes, quantize time.

Quick mode quantizes only the first decoder block of a copy of the model (a few seconds); full
mode quantizes the whole model with GPTQ and with RTN on 32 windows x 256 tokens.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from llmcourse.core.data import calibration_windows, load_text, tokenize_stream
from llmcourse.core.evaluate import compare, perplexity
from llmcourse.core.modules import decoder_blocks
from llmcourse.core.report import TourSection, html_table, pyplot, save_figure
from llmcourse.quant.gptq.model import GPTQConfig, checkpoint_state, quantize_model


def _first_blocks(model: Any, n: int) -> Any:
    """A copy of ``model`` that keeps only its first ``n`` decoder blocks (for the quick tour)."""
    small = copy.copy(model)
    small._modules = dict(small._modules)  # a shallow copy shares the submodule table: never edit the original's
    prefix, blocks = decoder_blocks(model)
    parent = small.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else small
    parent = copy.copy(parent)
    parent._modules = dict(parent._modules)
    setattr(parent, prefix.rpartition(".")[2], torch.nn.ModuleList([copy.deepcopy(b) for b in blocks[:n]]))
    if "." in prefix:
        setattr(small, prefix.partition(".")[0], parent)
    return small


def _plot(rows: list[dict[str, Any]], out_dir: Any) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ratio = [r["gptq_error"] / max(r["rtn_error"], 1e-30) for r in rows]
    ax.bar(range(len(rows)), ratio, color="tab:blue")
    ax.axhline(1.0, color="tab:red", lw=1, label="RTN")
    ax.set_ylabel("||WX - QX||², GPTQ / RTN")
    ax.set_xlabel("layer (block order: q k v o gate up down)")
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out_dir, "gptq_layer_error.png", "GPTQ / RTN output error per layer")


def section(ctx: Any) -> TourSection:
    """The GPTQ section (quick: first block only, a few seconds; full: the whole model twice, minutes)."""
    lm = ctx.lm
    quick = ctx.quick
    n, seq_len = (2, 128) if quick else (32, 256)
    windows = calibration_windows(lm.tokenizer, n, seq_len, seed=0)
    gptq_cfg = GPTQConfig(bits=4, group_size=128)
    rtn_cfg = GPTQConfig(bits=4, group_size=128, method="rtn")
    if quick:
        t0 = time.perf_counter()
        one_pass = GPTQConfig(bits=4, group_size=128, true_sequential=False)  # one forward of the block, not four
        report = quantize_model(_first_blocks(lm.model, 1), windows, one_pass)
        rows = report["layers"]
        table = html_table([{"layer": r["layer"], "inputs": r["columns"], "GPTQ error": r["gptq_error"],
                             "RTN error": r["rtn_error"], "GPTQ / RTN": r["gptq_error"] / r["rtn_error"]}
                            for r in rows])
        body = ("<p>Quick mode: the first block of the default model, 4-bit g128, on 2 x 128 calibration "
                "tokens. Error: mean squared output error per token, <code>||(W - Q) X||² / N</code>, "
                "from the layer's Hessian.</p>" + table + _plot(rows, ctx.out_dir))
        return TourSection("4-bit quantization with GPTQ", body, {"layers": rows,
                                                                  "seconds": time.perf_counter() - t0})
    ids = tokenize_stream(lm.tokenizer, load_text("default", "eval"))
    ppl_tokens, cmp_tokens = 1024, 512
    ref = perplexity(lm.model, ids, max_length=512, stride=512, max_tokens=ppl_tokens)["perplexity"]
    table = [{"method": "fp32", "perplexity": ref, "KL vs fp32": 0.0, "top-1 vs fp32": 1.0,
              "weights MB (fp16 rest)": round(sum(v.numel() * 2 for v in lm.model.state_dict().values()) / 1e6, 1),
              "quantize s": 0.0}]
    gptq_rows: list[dict[str, Any]] = []
    for cfg in (rtn_cfg, gptq_cfg):
        model = copy.deepcopy(lm.model)
        report = quantize_model(model, windows, cfg)
        if cfg.method == "gptq":
            gptq_rows = report["layers"]
        c = compare(model, lm.model, ids, max_length=cmp_tokens, max_tokens=cmp_tokens)
        table.append({"method": cfg.name,
                      "perplexity": perplexity(model, ids, max_length=512, stride=512,
                                               max_tokens=ppl_tokens)["perplexity"],
                      "KL vs fp32": c["kl_divergence"], "top-1 vs fp32": c["top1_agreement"],
                      "weights MB (fp16 rest)": round(sum(v.numel() * v.element_size()
                                                          for v in checkpoint_state(model).values()) / 1e6, 1),
                      "quantize s": round(report["seconds"], 1)})
        del model
    better = sum(r["gptq_error"] <= r["rtn_error"] for r in gptq_rows)
    body = (f"<p>The default model at 4-bit, groups of 128 (the 576-wide layers get a last group of 64), "
            f"calibrated on {n} x {seq_len} tokens of the calibration split. GPTQ's output error is at most "
            f"RTN's in {better} of {len(gptq_rows)} layers.</p>" + html_table(table)
            + f"<p class=\"muted\">Perplexity on the first {ppl_tokens} tokens of the eval split; KL and top-1 on "
            f"the first {cmp_tokens}. Weights: the bytes of the checkpoint's tensors.</p>" + _plot(gptq_rows, ctx.out_dir))
    return TourSection("4-bit quantization with GPTQ", body, {"table": table, "layers": gptq_rows})
