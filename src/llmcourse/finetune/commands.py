"""``llmcourse finetune`` and ``llmcourse merge``."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llmcourse.core.cli_common import Result, add_common_args, add_config_args, config_from_args, positive_int
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input
from llmcourse.core.lab import add_parser
from llmcourse.core.models import save_hf
from llmcourse.finetune.lora import METHODS, LoraSettings
from llmcourse.finetune.pref_train import PREFERENCE_METHODS, PreferenceConfig
from llmcourse.finetune.run import finetune, merge_adapter
from llmcourse.finetune.trainer import PRESETS, TrainConfig

GGUF_CONVERT_TYPES = ("f32", "f16", "bf16")
PRESET_FIELDS = tuple(sorted({k for values in PRESETS.values() for k in values}))  # flags a --preset fills in


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The options, over the preset's values where given (a preset-able flag left unset is None)."""
    preset = PRESETS[args.preset] if args.preset else {}
    fill = {k: v if (v := getattr(args, k)) is not None else preset.get(k, getattr(TrainConfig, k))
            for k in PRESET_FIELDS}
    return config_from_args(TrainConfig, args, **fill)


def objective(args: argparse.Namespace) -> tuple[str, PreferenceConfig | None]:
    """(what trains: lora/qlora/full, the preference settings or None for SFT) from --method and --adapter."""
    if args.method in METHODS:  # --method lora|qlora|full: supervised fine-tuning, as before
        if args.adapter is not None and args.adapter != args.method:
            raise UserError(f"--method {args.method} already says what trains; --adapter {args.adapter} contradicts it",
                            f"use --method sft --adapter {args.adapter}, or drop --adapter")
        return args.method, None
    adapter = args.adapter or "lora"
    if args.method == "sft":
        return adapter, None
    return adapter, config_from_args(PreferenceConfig, args, method=args.method)


def _processes(args: argparse.Namespace) -> Result:
    """Re-launch this command under torchrun with ``--processes`` CPU processes (gloo)."""
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--processes")
    del argv[i:i + 2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
           "-m", "llmcourse", *argv]
    rc = subprocess.call(cmd)
    if rc:
        raise UserError(f"the {args.processes}-process run failed (exit {rc})", "see its messages above")
    return Result({"processes": args.processes, "out": args.out}, f"{args.processes}-process run wrote {args.out}")


def _init_distributed() -> None:
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def cmd_finetune(args: argparse.Namespace) -> Result:
    if args.processes > 1:
        return _processes(args)
    _init_distributed()
    lora = config_from_args(LoraSettings, args)
    cfg = train_config(args)
    adapter, pref = objective(args)
    tb = (Path(args.out) / "tensorboard" if args.tensorboard == "" else args.tensorboard) if args.tensorboard is not None \
        else None
    r = finetune(args.model, args.data, adapter, lora, cfg, args.out, resume=args.resume, dtype=args.dtype,
                 tensorboard=tb, preference=pref, pair_samples=args.pair_samples)
    s = r.summary
    if int(os.environ.get("RANK", "0")) > 0:  # one report per run: rank 0's
        return Result(s, "")
    text = (f"{args.method} fine-tuning of {args.model}: {s['steps']} steps, {s['trainable_parameters']:,} trainable "
            f"of {s['parameters']:,} parameters; loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"
            + (f", held-out eval loss {s['eval_loss']:.3f}" if s["eval_loss"] is not None else "")
            + f"; {s['tokens_per_s']:.0f} tokens/s."
            + ("\nlast step: " + ", ".join(f"{k} {v:.3f}" for k, v in s["final_metrics"].items())
               if s.get("final_metrics") else "")
            + (f"\npairs: {s['pairs']['pairs']} on-policy pairs from {s['pairs']['samples']} sampled answers "
               f"({s['pairs']['sampled_right']} right), in {args.out}/pairs.jsonl" if s.get("pairs") else "")
            + (f"\nheld-out capitals: {s['held_out_accuracy']['before']:.1%} before, "
               f"{s['held_out_accuracy']['after']:.1%} after ({s['held_out_accuracy']['questions']} countries)"
               if "held_out_accuracy" in s else "")
            + f"\nwrote {args.out}: "
            + ", ".join(k for k in ("adapter", "merged") if k in s) + ", metrics.jsonl, loss.png, "
            + ("rewards.png, " if pref is not None else "") + "checkpoints/"
            + (f", TensorBoard logs in {tb} (tensorboard --logdir {tb})" if tb is not None else "")
            + f"\nnext: llmcourse chat --model {s.get('merged', args.out)}"
            + f"  |  llmcourse convert gguf --model {s.get('merged', args.out)} --out model.gguf")
    return Result(s, text)


def cmd_pairs(args: argparse.Namespace) -> Result:
    """Rebuild the default on-policy preference pairs from --model."""
    from llmcourse.core.models import load_model
    from llmcourse.finetune.pref_data import build_default_pairs, write_pairs

    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"--out {out} is not a .jsonl file", "pass --out pairs.jsonl")
    check_not_input(out, [args.model if args.model != "default" else None])
    lm = load_model(args.model, args.dtype)
    pairs, stats = build_default_pairs(lm.model, lm.tokenizer, samples=args.samples, seed=args.seed,
                                       show_progress=True)
    if not pairs:
        raise UserError(f"--model {args.model} answered every sampled question right: no pairs",
                        "raise --samples")
    write_pairs(out, pairs)
    text = (f"{stats['pairs']} pairs from {stats['questions']} questions on {stats['countries']} training countries "
            f"({stats['samples']} sampled answers, {stats['sampled_right']} right); wrote {out}\n"
            f"next: llmcourse finetune --model {args.model} --method dpo --data {out} --out out/dpo")
    return Result({**stats, "out": str(out)}, text)


def gguf_path(out: Path, gguf_type: str) -> Path:
    """Where ``merge --gguf TYPE`` writes: ``OUT-f16.gguf`` beside ``OUT`` for float types, else a folder
    ``OUT-gguf/`` holding ``OUT-TYPE.gguf`` (the quantize command's layout)."""
    if gguf_type in GGUF_CONVERT_TYPES:
        return out.parent / f"{out.name}-{gguf_type}.gguf"
    return out.parent / f"{out.name}-gguf"


def export_gguf(model, tokenizer, folder: Path, gguf_type: str, dest: Path) -> dict:
    """Write the merged ``model`` (saved in ``folder``) as GGUF through the GGUF lab's public API:
    ``convert_to_gguf`` for f32/f16/bf16 (one file ``dest``), ``quantize_gguf`` for a llama.cpp type such as Q8_0
    (a folder ``dest`` holding ``NAME-TYPE.gguf``, written atomically like ``quantize gguf``'s)."""
    from llmcourse.quant.gguf import convert_to_gguf, from_hf, get_preset, quantize_gguf

    if gguf_type in GGUF_CONVERT_TYPES:
        return convert_to_gguf(model, tokenizer, dest, gguf_type, name=folder.name, folder=folder)
    preset = get_preset(gguf_type)  # an unknown type fails here, before any work
    name = f"{folder.name}-{preset.name}.gguf"
    with atomic_dir(dest) as tmp:
        info = quantize_gguf(from_hf(model, tokenizer, "f32", folder.name, folder), tmp / name, preset)
    return {"files": [{**info, "out": str(dest / name)}]}


def cmd_merge(args: argparse.Namespace) -> Result:
    out = Path(args.out)
    check_not_input(out, [args.model if args.model != "default" else None, args.adapter])
    gguf = gguf_path(out, args.gguf) if args.gguf else None
    if gguf is not None:
        check_not_input(gguf, [args.model if args.model != "default" else None, args.adapter])
        if args.gguf not in GGUF_CONVERT_TYPES:
            from llmcourse.quant.gguf import get_preset

            get_preset(args.gguf)  # an unknown type: its one-line error before any work
    if args.push_to_hub:
        _check_hub(args.push_to_hub)
    merged, tok = merge_adapter(args.model, args.adapter)
    with atomic_dir(out) as tmp:
        save_hf(merged, tok, tmp)
    data = {"model": args.model, "adapter": args.adapter, "out": str(out)}
    text = f"wrote {out} (adapter {args.adapter} merged into {args.model})"
    if gguf is not None:
        try:
            info = export_gguf(merged, tok, out, args.gguf, gguf)
        except UserError:
            shutil.rmtree(out, ignore_errors=True)  # no partial output: the merged folder goes too
            raise
        files = [f["out"] for f in info["files"]] if "files" in info else [info["out"]]
        data["gguf"] = files[0] if len(files) == 1 else files
        text += "; GGUF " + ", ".join(files)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=args.push_to_hub)
        data["hub"] = f"https://huggingface.co/{args.push_to_hub}"
    return Result(data, text)


def _check_hub(repo: str) -> None:
    """Offline (the usual case here): a clear error before any work."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"cannot push to {repo}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE and retry online")
    try:
        from huggingface_hub import HfApi

        HfApi().whoami()
    except Exception as e:  # any failure of the Hub client means "cannot push"
        raise UserError(f"cannot push to {repo}: the Hugging Face Hub is not reachable or you are not logged in "
                        f"({type(e).__name__})", "run `hf auth login` online, or drop --push-to-hub") from None


FT_EXAMPLES = ("examples:\n  llmcourse finetune --model default --data default --method lora --max-steps 50 --out out/ft\n"
               "  llmcourse finetune --method qlora --preset course --lora-r 64 --lora-alpha 16 --out out/qlora\n"
               "  llmcourse finetune --data chats.jsonl --packing --dora --targets q_proj,v_proj --out out/ft2\n"
               "  llmcourse finetune --resume out/ft --max-steps 100 --out out/ft\n"
               "  llmcourse finetune --max-steps 60 --tensorboard --out out/ft && tensorboard --logdir out/ft/tensorboard\n"
               "  llmcourse finetune --processes 2 --max-steps 20 --out out/ddp\n"
               "  llmcourse finetune --model out/ft/merged --method dpo --data default --beta 0.1 --max-steps 60 "
               "--out out/dpo\n"
               "  llmcourse finetune --method dpo --adapter qlora --loss-type ipo --data pairs.jsonl --out out/ipo\n"
               "  llmcourse finetune --method orpo --orpo-lambda 0.1 --data pairs.jsonl --out out/orpo\n"
               "  llmcourse preference-pairs --model out/ft/merged --out pairs.jsonl")
PAIRS_EXAMPLES = ("examples:\n  llmcourse preference-pairs --model out/ft/merged --out pairs.jsonl\n"
                  "  llmcourse preference-pairs --samples 4 --seed 1 --out pairs.jsonl")
MERGE_EXAMPLES = ("examples:\n  llmcourse merge --model default --adapter out/ft/adapter --out out/merged\n"
                  "  llmcourse merge --adapter out/ft/adapter --out out/merged --gguf f16")


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from llmcourse.finetune import LAB

    p = add_parser(
        sub, groups, LAB, "finetune", epilog=FT_EXAMPLES,
        description="Fine-tuning of a causal LM: supervised (SFT) on chat data (.jsonl with 'messages' or 'prompt'/"
        "'response', or 'default': country facts with held-out countries). The chat template is applied and the "
        "loss is on the assistant tokens only (--full-loss: every token). lora: PEFT LoRA adapters on --targets; "
        "qlora: the same on a frozen NF4 base (4.13 bits/weight, de-quantized per layer); full: every weight. "
        "Preference tuning (--method dpo|orpo): .jsonl pairs in TRL's formats (prompt/chosen/rejected, text or "
        "messages), or 'default': the model's own wrong answers to country questions as rejected, the facts as "
        "chosen. Writes --out: adapter/ (PEFT), merged/ (plain HF folder), metrics.jsonl, loss.png, "
        "(rewards.png), checkpoints/.")
    p.add_argument("--model", default="default", help="base model: 'default' or a Hugging Face folder. Default: default")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the base (default: fp32)")
    p.add_argument("--data", default="default", help="a .jsonl file or 'default'. Default: %(default)s")
    p.add_argument("--method", default="lora", choices=[*METHODS, "sft", *PREFERENCE_METHODS],
                   help="lora / qlora / full: supervised fine-tuning with that much training; sft, dpo, orpo: the "
                   "objective, with --adapter saying what trains. dpo and orpo read preference pairs. Default: "
                   "%(default)s")
    p.add_argument("--adapter", default=None, choices=METHODS,
                   help="what trains with --method sft/dpo/orpo: LoRA, LoRA on an NF4 base, or every weight "
                   "(default: lora)")
    add_config_args(p, PreferenceConfig)
    p.add_argument("--pair-samples", type=positive_int, default=2,
                   help="dpo/orpo with --data default: answers sampled per question to find wrong ones. Default: 2")
    p.add_argument("--out", required=True, help="output folder (adapter/, merged/, metrics, checkpoints)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="'course': notebook 4's values (batch 4, lr 2e-4, warmup 0.03, weight decay 0.001, max "
                   "grad norm 0.3, 1 epoch); explicit options override it. Default: none")
    add_config_args(p, TrainConfig, defaults=dict.fromkeys(PRESET_FIELDS))  # unset: the preset's, else the field's
    add_config_args(p, LoraSettings)
    p.add_argument("--resume", default=None, help="a finetune --out folder or its checkpoints/step-N (default: none)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="write TensorBoard event logs (loss, learning rate, tokens/s, grad norm, eval loss) to DIR; "
                   "without DIR: OUT/tensorboard. Default: off")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="CPU processes (DDP over gloo through torchrun; the global batch is kept). Default: 1")
    add_common_args(p)
    p.set_defaults(func=cmd_finetune)

    q = add_parser(sub, groups, LAB, "preference-pairs", epilog=PAIRS_EXAMPLES,
                   description="Build on-policy preference pairs without annotators: for each training country of "
                   "the fine-tuning facts (held-out countries excluded) and each question (capital, continent, "
                   "currency), --samples answers are sampled from --model; a sampled answer that does not contain "
                   "the true fact becomes 'rejected', the true answer 'chosen'. Writes TRL's conversational JSONL.")
    q.add_argument("--model", default="default", help="the model to sample from (the one you will DPO-train). "
                   "Default: default")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the model (default: fp32)")
    q.add_argument("--out", required=True, help="the pairs .jsonl file (written atomically)")
    q.add_argument("--samples", type=positive_int, default=2, help="answers sampled per question. Default: 2")
    q.add_argument("--seed", type=_int, default=0, help="sampling seed (default: 0)")
    add_common_args(q)
    q.set_defaults(func=cmd_pairs)

    m = add_parser(sub, groups, LAB, "merge", epilog=MERGE_EXAMPLES,
                   description="Merge a PEFT LoRA adapter into its fp32 base (W + (alpha/r) B A) and write a plain "
                   "Hugging Face folder; --gguf TYPE also exports it through the GGUF lab's commands.")
    m.add_argument("--model", default="default", help="the base model the adapter was trained on. Default: default")
    m.add_argument("--adapter", required=True, help="the adapter folder (finetune --out DIR/adapter)")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--gguf", default=None, metavar="TYPE",
                   help="also write a GGUF: f32/f16/bf16 (convert gguf) or a quant type such as Q8_0 (quantize gguf)")
    m.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="push the merged folder to the Hub (offline: a clear error, nothing written)")
    add_common_args(m)
    m.set_defaults(func=cmd_merge)
