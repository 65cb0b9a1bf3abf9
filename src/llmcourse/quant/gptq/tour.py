"""Tour section of the GPTQ lab: per-layer output error GPTQ vs round-to-nearest, and (full mode) the
default model at 4-bit g128 — perplexity, KL and top-1 vs fp32, bytes, quantize time.

Quick mode quantizes only the first decoder block of a copy of the model (a few seconds); full
mode quantizes the whole model with GPTQ (on 32 windows x 256 tokens) and with RTN (no calibration),
then scores fp32, RTN and GPTQ on the same 512-token windows in one pass (one forward per model per
window): perplexity, KL(fp32 || model) and top-1 agreement, with the per-window spread of the
GPTQ - RTN differences, so the text says whether the ranking is settled on that many tokens.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from llmcourse.core.data import calibration_windows, load_text, tokenize_stream
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


EVAL_TOKENS, WINDOW = 8192, 512  # 16 windows: the GPTQ - RTN gap in KL is many standard errors wide


@torch.no_grad()
def score_windows(models: dict[str, Any], reference: Any, ids: torch.Tensor, tokens: int = EVAL_TOKENS,
                  window: int = WINDOW) -> dict[str, dict[str, list[float]]]:
    """Per window, each model's mean NLL, KL(P_ref || P_model) and top-1 agreement with ``reference``,
    on the non-overlapping ``window``-token windows of the first ``tokens`` of ``ids``; one forward of each
    model (and of the reference) per window. Same numbers as core ``perplexity(max_length=stride=window)``
    and ``compare(max_length=window)``."""
    ids = ids.reshape(1, -1)[:, :tokens]
    out: dict[str, dict[str, list[float]]] = {n: {"nll": [], "kl": [], "top1": [], "n": []} for n in models}
    for begin in range(0, ids.size(1) - 1, window):
        w = ids[:, begin:begin + window]
        if w.size(1) < 2:
            break
        targets = w[0, 1:]
        lq = F.log_softmax(reference(input_ids=w, use_cache=False).logits[0].float(), -1)
        for name, m in models.items():
            lp = lq if m is reference else F.log_softmax(m(input_ids=w, use_cache=False).logits[0].float(), -1)
            r = out[name]
            r["nll"].append(-lp[:-1].gather(1, targets[:, None]).mean().item())
            r["kl"].append((lq.exp() * (lq - lp)).sum(-1).mean().item())
            r["top1"].append((lp.argmax(-1) == lq.argmax(-1)).float().mean().item())
            r["n"].append(targets.numel())
    return out


def gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of the per-window differences ``a - b`` and its standard error."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = (d.std(unbiased=True) / len(d) ** 0.5).item() if len(d) > 1 else float("inf")
    return d.mean().item(), se


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
    table = [{"method": "fp32", "weights MB (fp16 rest)": round(sum(v.numel() * 2 for v in
                                                                   lm.model.state_dict().values()) / 1e6, 1),
              "quantize s": 0.0}]
    models: dict[str, Any] = {"fp32": lm.model}
    gptq_rows: list[dict[str, Any]] = []
    for cfg in (rtn_cfg, gptq_cfg):
        model = copy.deepcopy(lm.model)
        report = quantize_model(model, windows if cfg.method == "gptq" else None, cfg)  # RTN needs no data
        if cfg.method == "gptq":
            gptq_rows = report["layers"]
        models[cfg.name] = model
        table.append({"method": cfg.name,
                      "weights MB (fp16 rest)": round(sum(v.numel() * v.element_size()
                                                          for v in checkpoint_state(model).values()) / 1e6, 1),
                      "quantize s": round(report["seconds"], 1)})
    t0 = time.perf_counter()
    scores = score_windows(models, lm.model, ids)
    eval_s = time.perf_counter() - t0
    n_tok = sum(scores["fp32"]["n"])
    for row in table:
        sc = scores[row["method"]]
        nll = sum(x * k for x, k in zip(sc["nll"], sc["n"], strict=True)) / n_tok
        row["perplexity"] = float(torch.tensor(nll).exp())
        row["KL vs fp32"] = sum(x * k for x, k in zip(sc["kl"], sc["n"], strict=True)) / n_tok
        row["top-1 vs fp32"] = sum(x * k for x, k in zip(sc["top1"], sc["n"], strict=True)) / n_tok
    table = [{k: r[k] for k in ("method", "perplexity", "KL vs fp32", "top-1 vs fp32", "weights MB (fp16 rest)",
                                "quantize s")} for r in table]
    rtn, gptq = scores[rtn_cfg.name], scores[gptq_cfg.name]
    d_nll, se_nll = gap(gptq["nll"], rtn["nll"])
    d_kl, se_kl = gap(gptq["kl"], rtn["kl"])

    def verdict(d: float, se: float, what: str) -> str:
        if abs(d) > 2 * se:
            return f"GPTQ's {what} is {'lower' if d < 0 else 'higher'} (settled: the gap is {abs(d) / se:.1f} standard errors)"
        return f"the {what} ranking is not settled on these tokens (the gap is {abs(d) / se:.1f} standard errors)"

    better = sum(r["gptq_error"] <= r["rtn_error"] for r in gptq_rows)
    body = (f"<p>The default model at 4-bit, groups of 128 (the 576-wide layers get a last group of 64); GPTQ "
            f"calibrated on {n} x {seq_len} tokens of the calibration split, RTN needs none. GPTQ's output error "
            f"is at most RTN's in {better} of {len(gptq_rows)} layers.</p>" + html_table(table)
            + f"<p>Scored on the same {n_tok:,} tokens of the eval split ({len(rtn['n'])} windows of {WINDOW}, one "
            f"pass, {eval_s:.0f} s). Per window, GPTQ minus RTN: mean NLL {d_nll:+.4f} &plusmn; {se_nll:.4f}, "
            f"KL {d_kl:+.4f} &plusmn; {se_kl:.4f} (mean &plusmn; standard error): {verdict(d_nll, se_nll, 'perplexity')}; "
            f"{verdict(d_kl, se_kl, 'KL')}. <b>Which to trust:</b> KL to fp32, because it measures how far each "
            "quantized model's next-token distribution moved, on every token, with a far smaller spread than "
            "perplexity, whose differences of a few percent between two 4-bit models sit inside the sampling noise "
            "of a few thousand tokens (and this default model is itself a de-quantized Q4_1 file, so rounding can "
            "lower its perplexity by chance).</p>"
            + "<p class=\"muted\">Weights: the bytes of the checkpoint's tensors. Perplexity and KL as "
            "<code>llmcourse eval perplexity --max-length 512 --stride 512</code> and <code>llmcourse eval compare "
            "--max-length 512</code> on the same tokens.</p>" + _plot(gptq_rows, ctx.out_dir))
    summary = {"table": table, "layers": gptq_rows, "eval_tokens": n_tok, "eval_seconds": eval_s,
               "gptq_minus_rtn": {"nll": d_nll, "nll_se": se_nll, "kl": d_kl, "kl_se": se_kl}}
    return TourSection("4-bit quantization with GPTQ", body, summary)
