"""Tour section of the compression lab: which layers are redundant (input/output cosine similarity), and a
depth-pruned default model before and after a short distillation.

Quick mode: the similarities on 2 x 128 calibration tokens and Wanda 2:4 on a copy of the first block (a few
seconds). Full mode: the 8 most redundant of 30 layers dropped, perplexity and KL to the original before and
after distilling 8 steps x 2 x 256 tokens (forward KL and the LM loss, half and half), and Wanda at 50% / 2:4 on the whole model.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from llmcourse.compress.distill import DistillConfig, distill_model, token_windows
from llmcourse.compress.prune import PruneConfig, prune_model
from llmcourse.compress.structured import choose_layers, drop_layers, layer_similarities, n_parameters
from llmcourse.core.data import calibration_windows
from llmcourse.core.evaluate import compare
from llmcourse.core.report import TourSection, html_table, pyplot, save_figure


def _plot(sims: list[float], dropped: list[int], out_dir: Any) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(len(sims)), sims, color=["tab:red" if i in dropped else "tab:blue" for i in range(len(sims))])
    ax.set_xlabel("decoder layer (red: dropped)")
    ax.set_ylabel("mean cos(h_in, h_out)")
    ax.set_ylim(min(sims) - 0.05, 1.0)
    ax.grid(alpha=0.3)
    return save_figure(fig, out_dir, "compress_similarity.png", "cosine similarity of each layer's input and output")


def section(ctx: Any) -> TourSection:
    """The compression section (quick: seconds; full: a few minutes)."""
    t0 = time.perf_counter()
    lm = ctx.lm
    n, seq_len = (2, 128) if ctx.quick else (8, 256)
    windows = calibration_windows(lm.tokenizer, n, seq_len, seed=0)
    sims = layer_similarities(lm.model, windows)
    k = len(sims) // 4 + (len(sims) % 4 > 0)
    dropped = choose_layers(sims, k)
    body = (f"<p>How much each decoder layer changes the residual stream: the mean cosine similarity of its input "
            f"and output hidden states on {n} x {seq_len} calibration tokens. The {k} most similar layers are the "
            f"ones depth pruning drops: {dropped}.</p>" + _plot(sims, dropped, ctx.out_dir))
    summary: dict[str, Any] = {"similarities": sims, "dropped": dropped}
    if ctx.quick:
        from llmcourse.core.modules import decoder_blocks

        # a copy that owns block 0 and shares every other tensor with the tour's model (pruning touches only
        # block 0): not a 0.5 GB copy of the whole model
        first = {id(t) for t in decoder_blocks(lm.model)[1][0].state_dict(keep_vars=True).values()}
        shared = {id(t): t for t in lm.model.state_dict(keep_vars=True).values() if id(t) not in first}
        model = copy.deepcopy(lm.model, shared)
        _, blocks = decoder_blocks(model)
        del blocks[1:]
        rep = prune_model(model, windows, PruneConfig("wanda", nm=(2, 4)))
        summary["wanda_first_block_sparsity"] = rep["sparsity"]
        body += f"<p>Wanda 2:4 on the first block: sparsity {rep['sparsity']:.3f} (every group of 4 keeps 2).</p>"
        summary["seconds"] = time.perf_counter() - t0
        return TourSection("Pruning and distillation", body, summary)
    ref = ctx.reference["perplexity"]
    rows = [{"model": "fp32 (30 layers)", "parameters (M)": n_parameters(lm.model) / 1e6, "perplexity": ref,
             "KL vs fp32": 0.0, "top-1 vs fp32": 1.0}]
    student = copy.deepcopy(lm.model)
    drop_layers(student, dropped)

    def row(name: str, model: Any) -> dict[str, Any]:
        c = compare(model, lm.model, ctx.span.ids, max_length=512, max_tokens=512)
        return {"model": name, "parameters (M)": n_parameters(model) / 1e6,
                "perplexity": ctx.perplexity(model)["perplexity"], "KL vs fp32": c["kl_divergence"],
                "top-1 vs fp32": c["top1_agreement"]}

    rows.append(row(f"{k} layers dropped", student))
    cfg = DistillConfig(tokens=8 * 2 * 256, batch_size=2, seq_len=256, lr=1e-4, eval_every=0, eval_windows=1)
    train = token_windows(lm.tokenizer, "default", "train", cfg.seq_len)
    held = token_windows(lm.tokenizer, "default", "eval", cfg.seq_len)[:1]
    res = distill_model(student, lm.model, train, held, cfg)
    rows.append(row(f"... distilled on {res.tokens:,} tokens", res.student))
    for pc in (PruneConfig("wanda", sparsity=0.5), PruneConfig("wanda", nm=(2, 4))):
        model = copy.deepcopy(lm.model)
        prune_model(model, windows, pc)
        rows.append(row(f"Wanda {pc.pattern}", model))
        del model
    body += (html_table(rows) + "<p class=\"muted\">Perplexity on the tour's evaluation span; KL and top-1 on its "
             "first 512 tokens. Distillation: forward KL averaged half and half with the LM loss (--ce-weight 0.5), full fine-tuning, 8 steps of 2 x 256 tokens.</p>")
    summary.update(table=rows, seconds=time.perf_counter() - t0)
    return TourSection("Pruning and distillation", body, summary)
