"""Tour section of the GGUF lab: what each llama.cpp preset costs in size and quality.

The default model is converted to F32 GGUF in memory and quantized with several presets; each file's
weights are de-quantized back into a copy of the model, which is scored on the same window of text, from
non-overlapping windows: perplexity ``exp(mean NLL)`` (``core.evaluate.perplexity`` with
``max_length = stride``), KL(P_fp32 || P_quant) per token and top-1 agreement with the fp32 model
(``core.evaluate.compare``).
Full mode runs 5 presets (the tour's time budget; `quantize gguf --type` takes every one) on 2,048 tokens (four 512-token windows); quick mode one preset on 64 tokens.
Both caps are stated on the page.
"""

from __future__ import annotations

import copy
import html
import tempfile
import time
from pathlib import Path
from typing import Any

from llmcourse.core.data import load_text, tokenize_stream
from llmcourse.core.errors import UserError
from llmcourse.core.evaluate import compare, perplexity
from llmcourse.core.report import TourSection, html_table
from llmcourse.quant.gguf.convert import from_hf
from llmcourse.quant.gguf.load import load_weights
from llmcourse.quant.gguf.presets import quantize_gguf

FULL_PRESETS = ["Q2_K", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"]
QUICK_PRESETS = ["Q4_0"]
WINDOW = 512


def _chart(rows: list[dict[str, Any]], fp32: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([r["MB"] for r in rows], [r["perplexity"] for r in rows], color="tab:blue")
    for r in rows:
        ax.annotate(r["preset"], (r["MB"], r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(fp32["perplexity"], color="gray", ls="--", lw=1, label=f"fp32 ({fp32['MB']:.0f} MB)")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title("llama.cpp presets on SmolLM2-135M: size vs perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scores(model: Any, reference: Any, ids: Any) -> dict[str, float]:
    """Perplexity (``core.evaluate.perplexity`` on non-overlapping windows) and KL(P_ref || P) / top-1
    agreement against the reference model (``core.evaluate.compare``), on the same windows."""
    window = min(WINDOW, ids.shape[1])
    ppl = perplexity(model, ids, max_length=window, stride=window, weighting="exact")["perplexity"]
    if model is reference:
        return {"perplexity": ppl, "KL vs fp32": 0.0, "top-1 agreement": 1.0}
    c = compare(model, reference, ids, max_length=window, max_tokens=None)
    return {"perplexity": ppl, "KL vs fp32": c["kl_divergence"], "top-1 agreement": c["top1_agreement"]}


def section(ctx: Any) -> TourSection:
    """Per-preset file size, bits/weight, perplexity, KL vs fp32 and quantize time, with a chart."""
    lm = ctx.lm
    presets = QUICK_PRESETS if ctx.quick else FULL_PRESETS
    n_tokens = 64 if ctx.quick else 4 * WINDOW
    ids = tokenize_stream(lm.tokenizer, load_text("default", "eval"))[:, :n_tokens]
    t0 = time.perf_counter()
    try:
        g = from_hf(lm.model, lm.tokenizer, "f32", folder=lm.path if lm.path and Path(lm.path).is_dir() else None)
    except UserError as e:  # a model this converter cannot write (a SentencePiece vocabulary: Gemma 3's)
        body = (f"<p>This model cannot be written as a GGUF file here: {html.escape(str(e))}. Its weights load from "
                "GGUF (<code>llmcourse eval perplexity --model FILE.gguf</code>), and the other sections ran.</p>")
        return TourSection("GGUF: llama.cpp presets, size vs quality", body, {"skipped": str(e)})
    convert_s = time.perf_counter() - t0
    n_weights = sum(t.numel() for _, t in g.weights)
    fp32_ppl = _scores(lm.model, lm.model, ids)["perplexity"]
    fp32 = {"MB": 4 * n_weights / 1e6, "perplexity": fp32_ppl}
    work = copy.deepcopy(lm.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            path = Path(tmp) / f"model-{name}.gguf"
            info = quantize_gguf(g, path, name)
            load_weights(work, path)
            rows.append({"preset": name, "MB": info["bytes"] / 1e6, "bits/weight": info["bits_per_weight"],
                         **_scores(work, lm.model, ids), "quantize s": info["seconds"]})
            path.unlink()
    chart = "gguf_size_perplexity.png"
    _chart(rows, fp32, Path(ctx.out_dir) / chart)
    rows.sort(key=lambda r: r["MB"])
    table = html_table([{"preset": "fp32 (F32 GGUF)", "MB": fp32["MB"], "bits/weight": 32.0,
                         "perplexity": fp32_ppl, "KL vs fp32": 0.0, "top-1 agreement": 1.0,
                         "quantize s": convert_s}] + rows)
    cap = (f"{len(presets)} of the 14 presets, perplexity and KL on the first {n_tokens} tokens of the eval split "
           f"(windows of {min(WINDOW, n_tokens)} tokens): a {'quick' if ctx.quick else 'two-minute'} budget. `llmcourse quantize gguf --type ...` "
           "and `llmcourse eval perplexity --model FILE.gguf` run any preset on the whole text.")
    body = (
        "<p>The default model converted to GGUF and quantized with llama.cpp's presets by our own Python code "
        "(byte-identical to <code>llama_model_quantize</code>). Its 576-wide rows are not multiples of the "
        "k-quants' 256-value blocks, so most k-quant tensors fall back to Q4_0/Q5_0/Q5_1/Q8_0, and the tied "
        "embedding matrix (also the output layer) takes Q8_0: the k-quant presets are bigger here than on "
        "larger models. The weights also carry the packaged file's Q4_1 rounding, so Q4_1-like presets lose "
        "less than they would from a full-precision checkpoint.</p>"
        f"<p class=\"muted\">{html.escape(cap)}</p>{table}<img src=\"{chart}\" alt=\"size vs perplexity\">"
    )
    summary = {"tokens": n_tokens, "fp32_perplexity": fp32_ppl,
               "presets": {r["preset"]: {k: v for k, v in r.items() if k != "preset"} for r in rows}}
    return TourSection("GGUF: llama.cpp presets, size vs quality", body, summary)
