"""LoRA SFT of the default model: llmcourse's loop against TRL's SFTTrainer + PEFT, same settings, same run.

Settings on both sides: LoRA r=16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down; batch 4, sequences
<= 256 tokens (the country-facts data, one example per row, padded to the longest in the batch, no packing),
loss on the response tokens only, AdamW lr 2e-4 with cosine schedule and warmup ratio 0.03, weight decay
0.001, max grad norm 0.3, fp32 and gradient checkpointing off (TRL's defaults bf16=True and
gradient_checkpointing=True are switched off explicitly: ``bf16=False, gradient_checkpointing=False``).
TRL gets the same examples in its prompt-completion format, so it applies the same chat template and
masks the same prompt tokens. Each side runs in a fresh process (peak RSS is the process's ``ru_maxrss``);
tokens/s is real (non-padding) tokens over training time.

    .venv/bin/python bench/finetune.py [--steps 20] [--threads 2]

Needs ``trl==1.16.0`` (installs into .venv next to our pins; ``pip install trl==1.16.0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LORA = dict(r=16, alpha=32.0, dropout=0.05)
TRAIN = dict(batch_size=4, lr=2e-4, warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3, seq_len=256)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def run_ours(steps: int) -> dict:
    from llmcourse.core.models import load_model
    from llmcourse.finetune.lora import LoraSettings, add_lora
    from llmcourse.finetune.run import pad_id, rows_for
    from llmcourse.finetune.sft_data import load_sft_data
    from llmcourse.finetune.trainer import TrainConfig, train

    lm = load_model("default")
    cfg = TrainConfig(**TRAIN, max_steps=steps)
    train_ex, _ = load_sft_data("default")
    rows = rows_for(lm.tokenizer, train_ex, cfg)
    import torch

    torch.manual_seed(0)
    model = add_lora(lm.model, LoraSettings(**LORA))
    state = train(model, rows, [], cfg, pad_id(lm.tokenizer), show_progress=False)
    return {"side": "llmcourse", "tokens": state.tokens, "seconds": state.seconds,
            "tokens_per_s": state.tokens / state.seconds, "peak_rss_gb": peak_rss_gb(),
            "first_loss": state.metrics[0]["loss"], "last_loss": state.metrics[-1]["loss"]}


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
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
                     learning_rate=TRAIN["lr"], lr_scheduler_type="cosine", warmup_steps=math.ceil(TRAIN["warmup_ratio"] * steps),
                     weight_decay=TRAIN["weight_decay"], max_grad_norm=TRAIN["max_grad_norm"],
                     max_length=TRAIN["seq_len"], packing=False, bf16=False, fp16=False,
                     gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, dataloader_num_workers=0, seed=0, completion_only_loss=True)

    class Tokens(TrainerCallback):
        def __init__(self) -> None:
            self.tokens, self.seconds, self.t0 = 0, 0.0, 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.seconds += time.perf_counter() - self.t0

    cb = Tokens()
    torch.manual_seed(0)
    trainer = SFTTrainer(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer,
                         peft_config=peft_cfg, callbacks=[cb])
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = int(max(h.get("num_tokens", 0) for h in trainer.state.log_history))
    return {"side": "trl", "tokens": tokens, "seconds": cb.seconds, "tokens_per_s": tokens / cb.seconds,
            "train_runtime": out.metrics.get("train_runtime"), "peak_rss_gb": peak_rss_gb(),
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per side (default: 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(run_ours(a.steps) if a.side == "ours" else run_trl(a.steps)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = {}
    for side in ("ours", "trl"):
        p = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(a.steps),
                            "--threads", str(a.threads)], capture_output=True, text=True, env=env)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        res[side] = json.loads(p.stdout.strip().splitlines()[-1])
        print(side, res[side], flush=True)
    ratio = res["ours"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    mem = res["ours"]["peak_rss_gb"] / res["trl"]["peak_rss_gb"]
    print(f"throughput ours/TRL {ratio:.2f}x (target >= 1.2x); peak RSS ours/TRL {mem:.2f}x (target <= 1.0x)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "finetune.json").write_text(json.dumps({"steps": a.steps, "threads": a.threads, **res,
                                                                "throughput_ratio": ratio, "rss_ratio": mem},
                                                               indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
