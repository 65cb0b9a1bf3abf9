"""DPO with LoRA r=16 on the default model: llmcourse's loop against TRL's DPOTrainer + PEFT, same settings, same run.

Settings on both sides: LoRA r=16, alpha 32 on q,k,v,o,gate,up,down; dropout off in the whole model (TRL's
``disable_dropout=True``; ours does the same for preference tuning); DPO sigmoid loss, beta 0.1; batch 4 pairs;
AdamW lr 5e-5, cosine schedule with warmup ratio 0.03, weight decay 0.001, max grad norm 0.3; fp32 weights and
compute (TRL ``bf16=False``); gradient checkpointing off on both; the reference is the base model with the
adapters disabled, computed in every step on both sides (TRL: a PEFT model and no ``ref_model``,
``precompute_ref_log_probs=False``; ours: the same, ``precompute_ref=False``); sequences <= 256 tokens (none is
truncated). The pairs are the conversational country pairs of the fine-tuning lab with a fixed rejected answer
(the true answer of the next country in the list), so the benchmark measures training, not sampling; both sides
get the same JSONL objects and tokenize them the same way (the equivalence tests check the token ids).

Measurement: each side runs in a fresh process (peak RSS ``ru_maxrss``: model load and training). Every
optimizer step is timed (TRL: a callback from ``on_step_begin`` to ``on_step_end``). Throughput counts the tokens
as TRL does (its ``num_tokens``: prompt + chosen and prompt + rejected, the prompt twice) on both sides, so
the same pairs are the same tokens; the median over the steps after ``--warmup``. With ``--rounds 2`` the
sides alternate twice (ours, TRL, ours, TRL) and each side's median over its rounds is reported, which
evens out a machine whose load changes.

    .venv/bin/python bench/preference.py               # 8 steps, 2 warm-up, 1 round, 2 threads
    .venv/bin/python bench/preference.py --threads 1   # on a shared machine (2 threads collapse when a core is taken)
    .venv/bin/python bench/preference.py --quick       # 3 steps, 1 warm-up (smoke)

Needs ``trl==1.16.0`` (the ``ref`` / ``bench`` extras). Writes bench/results/preference.md and preference.json.
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
LORA = dict(r=16, alpha=32.0, dropout=0.0)
TRAIN = dict(batch_size=4, lr=5e-5, warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3, seq_len=256)
BETA = 0.1
TARGET_SPEED, TARGET_MEM = 1.3, 0.8


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def bench_pairs() -> list[dict]:
    """Country pairs in TRL's conversational format: chosen the true answer, rejected the next country's."""
    from llmcourse.finetune.pref_data import country_questions
    from llmcourse.finetune.sft_data import default_split

    train_c, _ = default_split()
    out = []
    for i, c in enumerate(train_c):
        other = train_c[(i + 1) % len(train_c)]
        for (q, a, _), (_, wrong, _) in zip(country_questions(c), country_questions(other), strict=False):
            wrong = wrong.replace(other["name"], c["name"])
            if wrong != a:
                out.append({"prompt": [{"role": "user", "content": q}],
                            "chosen": [{"role": "assistant", "content": a}],
                            "rejected": [{"role": "assistant", "content": wrong}]})
    return out


def summarize(side: str, step_tokens: list[int], step_seconds: list[float], warmup: int, losses: list[float]) -> dict:
    rates = [n / t for n, t in zip(step_tokens, step_seconds, strict=True)][warmup:]
    return {"side": side, "steps": len(step_seconds), "tokens_per_step": statistics.median(step_tokens),
            "step_seconds": [round(t, 3) for t in step_seconds], "tokens_per_s": statistics.median(rates),
            "peak_rss_gb": peak_rss_gb(), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def run_ours(steps: int, warmup: int) -> dict:
    import torch

    from llmcourse.core.models import load_model
    from llmcourse.finetune.lora import LoraSettings, add_lora
    from llmcourse.finetune.pref_data import parse_pair, tokenize_pairs
    from llmcourse.finetune.pref_train import PreferenceConfig, PreferenceObjective, disable_dropout
    from llmcourse.finetune.trainer import TrainConfig, micro_batch, train

    lm = load_model("default")
    cfg = TrainConfig(**TRAIN, max_steps=steps)
    rows = tokenize_pairs(lm.tokenizer, [parse_pair(p, "bench") for p in bench_pairs()], cfg.seq_len)
    torch.manual_seed(0)
    model = add_lora(lm.model, LoraSettings(**LORA))
    disable_dropout(model)
    state = train(model, rows, [], cfg, 0, show_progress=False,
                  objective=PreferenceObjective(PreferenceConfig(beta=BETA)))
    m = state.metrics
    trl_tokens = [sum(2 * len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids)
                      for r in micro_batch(rows, cfg, s)) for s in range(len(m))]
    return summarize("llmcourse", trl_tokens, [r["tokens"] / r["tokens_per_s"] for r in m], warmup,
                     [r["loss"] for r in m])


def run_trl(steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from llmcourse.core.models import load_model
    from llmcourse.finetune.lora import DEFAULT_TARGETS

    lm = load_model("default")
    ds = Dataset.from_list(bench_pairs())
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=list(DEFAULT_TARGETS), bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir="/tmp/bench-trl-dpo", max_steps=steps, per_device_train_batch_size=TRAIN["batch_size"],
                     learning_rate=TRAIN["lr"], lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(TRAIN["warmup_ratio"] * steps), weight_decay=TRAIN["weight_decay"],
                     max_grad_norm=TRAIN["max_grad_norm"], max_length=TRAIN["seq_len"], beta=BETA,
                     loss_type=["sigmoid"], bf16=False, fp16=False, gradient_checkpointing=False,
                     precompute_ref_log_probs=False, disable_dropout=True, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)

    from common import trl_timed

    tokens, seconds, losses = trl_timed(lambda callbacks: DPOTrainer(
        model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer, peft_config=peft_cfg,
        callbacks=callbacks))
    return summarize("trl", tokens, seconds, warmup, losses)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per side (default: 8)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side (default: 2)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds ours/TRL (default: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up")
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = 3, 1
    if a.steps <= a.warmup:
        ap.error("--steps must be larger than --warmup")
    if a.side:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps((run_ours if a.side == "ours" else run_trl)(a.steps, a.warmup)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    t_start = time.perf_counter()
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for rnd in range(a.rounds):
        for side in ("ours", "trl"):
            p = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--warmup",
                                str(a.warmup), "--threads", str(a.threads)], capture_output=True, text=True, env=env)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs[side].append(r)
            print(f"round {rnd + 1} {side:4}: {r['tokens_per_s']:.1f} tokens/s, {r['peak_rss_gb']:.2f} GB, "
                  f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}", flush=True)
    med = {s: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
               "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs)} for s, rs in runs.items()}
    speed = med["ours"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    mem = med["ours"]["peak_rss_gb"] / med["trl"]["peak_rss_gb"]
    rows = []
    for side, name in (("ours", "llmcourse"), ("trl", "TRL 1.16 DPOTrainer + PEFT")):
        r = runs[side][-1]
        rows.append({"trainer": name, "tokens/s (median)": round(med[side]["tokens_per_s"], 1),
                     "peak RSS GB": round(med[side]["peak_rss_gb"], 2), "tokens/step": r["tokens_per_step"],
                     "loss first -> last": f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"})
    rows.append({"trainer": "**ours / TRL**", "tokens/s (median)": f"**{speed:.2f}x** (target >= {TARGET_SPEED}x)",
                 "peak RSS GB": f"**{mem:.2f}x** (target <= {TARGET_MEM}x)"})
    import torch
    from common import machine, md_table, write_result

    torch.set_num_threads(a.threads)  # so that the machine line names the threads each side ran with
    notes = (f"{a.steps} optimizer steps per run, median of steps {a.warmup + 1}-{a.steps} (tokens of the step as TRL "
             f"counts them / its seconds), {a.threads} threads, {a.rounds} round(s), each run in its own process "
             "(peak RSS includes loading the model). DPO sigmoid, beta 0.1, LoRA r=16 alpha 32 on the 7 projections, "
             "dropout off, batch 4 pairs, fp32, no gradient checkpointing, reference = adapters off in each step on "
             f"both sides. Whole benchmark: {time.perf_counter() - t_start:.0f} s. Reproduce: "
             f"`.venv/bin/python bench/preference.py{' --quick' if a.quick else ''} --rounds {a.rounds}`.")
    write_result("preference", "Preference tuning: DPO with LoRA on the default model, llmcourse vs TRL",
                 md_table(rows), notes)
    (HERE / "results" / "preference.json").write_text(json.dumps(
        {"steps": a.steps, "warmup": a.warmup, "threads": a.threads, "rounds": a.rounds, "machine": machine(),
         "runs": runs, "ratio": {"throughput": speed, "peak_rss": mem,
                                 "met": speed >= TARGET_SPEED and mem <= TARGET_MEM}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
