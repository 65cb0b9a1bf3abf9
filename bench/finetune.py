"""LoRA SFT of the default model: llmcourse's loop against TRL's SFTTrainer + PEFT, same settings, same run.

Settings on both sides: LoRA r=16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down; batch 4, sequences
<= 256 tokens (the country-facts data, one example per sequence, no packing across examples), loss on the
response tokens only, AdamW lr 2e-4 with a cosine schedule and warmup ratio 0.03, weight decay 0.001, max
grad norm 0.3, fp32 weights and compute.

TRL's own defaults are ``bf16=True`` and ``gradient_checkpointing=True``. Both sides run in fp32 here
(TRL: ``bf16=False, fp16=False``; llmcourse trains in fp32), and the comparison is made twice, with the same
checkpointing setting on both sides: off (TRL ``gradient_checkpointing=False``; ours
``TrainConfig(gradient_checkpointing=False)``) and on (TRL ``gradient_checkpointing=True`` with
non-reentrant ``torch.utils.checkpoint``; ours ``gradient_checkpointing=True``, the same transformers
mechanism: one decoder block recomputed at a time). TRL gets the same examples in its prompt-completion
format, so it applies the same chat template and masks the same prompt tokens (``completion_only_loss``).

Measurement: each (side, setting) runs in a fresh process, so its peak RSS (``ru_maxrss``: model load and
training) is its own. Every optimizer step is timed (TRL: a callback from ``on_step_begin`` to
``on_step_end``); throughput is the median over the steps after ``--warmup`` of real (non-padding) tokens of
the step / its seconds. llmcourse's differences are in its loop, not in the settings: padding-free
micro-batches (the 4 examples end to end in one row with per-example position ids and a block mask, so no
pad token is computed), the output head only on response positions, LoRA's dropout and scale applied on the
rank-r side (``finetune/fused.py``), frozen base weights (no weight-gradient matmuls, as in TRL).

    .venv/bin/python bench/finetune.py                 # 12 steps, 2 warm-up, both settings (about 10 min)
    .venv/bin/python bench/finetune.py --quick         # 3 steps, 1 warm-up, checkpointing off (smoke)

Needs ``trl==1.16.0`` (the ``bench`` extra). Writes bench/results/finetune.md and finetune.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
LORA = dict(r=16, alpha=32.0, dropout=0.05)
TRAIN = dict(batch_size=4, lr=2e-4, warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3, seq_len=256)
TARGET_SPEED, TARGET_MEM = 1.2, 1.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def summarize(side: str, step_tokens: list[int], step_seconds: list[float], warmup: int, losses: list[float]) -> dict:
    rates = [n / t for n, t in zip(step_tokens, step_seconds, strict=True)][warmup:]
    return {"side": side, "steps": len(step_seconds), "tokens_per_step": statistics.median(step_tokens),
            "step_seconds": [round(t, 3) for t in step_seconds], "tokens_per_s": statistics.median(rates),
            "peak_rss_gb": peak_rss_gb(), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def run_ours(steps: int, warmup: int, checkpointing: bool) -> dict:
    import torch

    from llmcourse.core.models import load_model
    from llmcourse.finetune.lora import LoraSettings, add_lora
    from llmcourse.finetune.run import pad_id, rows_for
    from llmcourse.finetune.sft_data import load_sft_data
    from llmcourse.finetune.trainer import TrainConfig, train

    lm = load_model("default")
    cfg = TrainConfig(**TRAIN, max_steps=steps, gradient_checkpointing=checkpointing)
    train_ex, _ = load_sft_data("default")
    rows = rows_for(lm.tokenizer, train_ex, cfg)
    torch.manual_seed(0)
    model = add_lora(lm.model, LoraSettings(**LORA))
    state = train(model, rows, [], cfg, pad_id(lm.tokenizer), show_progress=False)
    m = state.metrics
    return summarize("llmcourse", [r["tokens"] for r in m], [r["tokens"] / r["tokens_per_s"] for r in m], warmup,
                     [r["loss"] for r in m])


def run_trl(steps: int, warmup: int, checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from llmcourse.core.models import load_model
    from llmcourse.finetune.lora import DEFAULT_TARGETS
    from llmcourse.finetune.sft_data import load_sft_data

    lm = load_model("default")
    train_ex, _ = load_sft_data("default")
    ds = Dataset.from_list([{"prompt": [m for m in ex if m["role"] != "assistant"],
                             "completion": [m for m in ex if m["role"] == "assistant"]} for ex in train_ex])
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=list(DEFAULT_TARGETS), bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir="/tmp/bench-trl", max_steps=steps, per_device_train_batch_size=TRAIN["batch_size"],
                     learning_rate=TRAIN["lr"], lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(TRAIN["warmup_ratio"] * steps),
                     weight_decay=TRAIN["weight_decay"], max_grad_norm=TRAIN["max_grad_norm"],
                     max_length=TRAIN["seq_len"], packing=False, bf16=False, fp16=False,
                     gradient_checkpointing=checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                     seed=0, completion_only_loss=True)

    from common import trl_timed

    tokens, seconds, losses = trl_timed(lambda callbacks: SFTTrainer(
        model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer, peft_config=peft_cfg,
        callbacks=callbacks))
    return summarize("trl", tokens, seconds, warmup, losses)


def machine_line() -> str:
    from common import machine

    return machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per side and setting (default: 12)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side (default: 2)")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                    help="gradient checkpointing on both sides (default: both settings, one after the other)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up, checkpointing off")
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.checkpointing = 3, 1, "off"
    if a.steps <= a.warmup:
        ap.error("--steps must be larger than --warmup")
    if a.side:
        import torch

        torch.set_num_threads(a.threads)
        run = run_ours if a.side == "ours" else run_trl
        print(json.dumps(run(a.steps, a.warmup, a.checkpointing == "on")))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    settings = ["off", "on"] if a.checkpointing == "both" else [a.checkpointing]
    t_start = time.perf_counter()
    rows, res = [], {}
    for ck in settings:
        for side in ("ours", "trl"):
            p = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--warmup",
                                str(a.warmup), "--threads", str(a.threads), "--checkpointing", ck],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(p.stdout.strip().splitlines()[-1])
            res[f"{side}-checkpointing-{ck}"] = r
            print(f"{side:4} checkpointing {ck}: {r['tokens_per_s']:.1f} tokens/s, {r['peak_rss_gb']:.2f} GB",
                  flush=True)
        ours, trl = res[f"ours-checkpointing-{ck}"], res[f"trl-checkpointing-{ck}"]
        speed, mem = ours["tokens_per_s"] / trl["tokens_per_s"], ours["peak_rss_gb"] / trl["peak_rss_gb"]
        for side, r in (("llmcourse", ours), ("TRL 1.16 SFTTrainer + PEFT", trl)):
            rows.append({"trainer": side, "checkpointing": ck, "tokens/s (median)": round(r["tokens_per_s"], 1),
                         "peak RSS GB": round(r["peak_rss_gb"], 2), "tokens/step": r["tokens_per_step"],
                         "loss first -> last": f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"})
        rows.append({"trainer": "**ours / TRL**", "checkpointing": ck,
                     "tokens/s (median)": f"**{speed:.2f}x** (target >= {TARGET_SPEED}x)",
                     "peak RSS GB": f"**{mem:.2f}x** (target <= {TARGET_MEM}x)"})
        res[f"ratio-checkpointing-{ck}"] = {"throughput": speed, "peak_rss": mem,
                                            "met": speed >= TARGET_SPEED and mem <= TARGET_MEM}
    from common import md_table, write_result

    notes = (f"{a.steps} optimizer steps per run, median of steps {a.warmup + 1}-{a.steps} (real tokens of the step / "
             f"its seconds), {a.threads} threads, each run in its own process (peak RSS includes loading the model). "
             "LoRA r=16, alpha 32, dropout 0.05 on the 7 projections, batch 4, seq <= 256, fp32 on both sides "
             "(TRL's default bf16 switched off), gradient checkpointing set alike on both sides. "
             f"Whole benchmark: {time.perf_counter() - t_start:.0f} s. Reproduce: `.venv/bin/python bench/finetune.py"
             f"{' --quick' if a.quick else ''}`; reference measured earlier here: TRL 98.6 tokens/s at 3.95 GB "
             "(checkpointing off), 73.8 at 2.43 GB (on).")
    write_result("finetune", "Fine-tuning: LoRA SFT of the default model, llmcourse vs TRL", md_table(rows), notes)
    (HERE / "results" / "finetune.json").write_text(json.dumps(
        {"steps": a.steps, "warmup": a.warmup, "threads": a.threads, "machine": machine_line(), **res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
