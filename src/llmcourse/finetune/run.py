"""One fine-tuning run end to end: load, prepare (LoRA / QLoRA / full), train, export, and score.

Outputs of :func:`finetune` in ``out``:

* ``adapter/``: the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), whose
  ``base_model_name_or_path`` is the base model's folder (LoRA / QLoRA);
* ``merged/``: a plain Hugging Face folder with the adapter merged into the fp32 base (all methods), which
  ``load_model``, ``AutoModelForCausalLM.from_pretrained`` and ``llmcourse convert gguf`` read;
* ``metrics.jsonl`` (one line per step), ``loss.png``, ``summary.json``, ``checkpoints/step-N/``;
* DPO / ORPO: ``rewards.png`` (chosen and rejected rewards, their margin) and, with the default data, the
  on-policy ``pairs.jsonl`` it trained on;
* with ``tensorboard``: TensorBoard event files there (``--tensorboard``: ``out/tensorboard``).

The held-out score :func:`capital_accuracy`: for each held-out country, the chat prompt "What is the
capital of X?" followed by the start of the answer "The capital of X is"; correct when greedy decoding
of the next tokens gives exactly the capital (one teacher-forced forward per question, so before and after
use the same prefix and the score is cheap).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmcourse.core.chat_template import chat_ids
from llmcourse.core.errors import UserError
from llmcourse.core.io import atomic_dir, check_not_input, write_json
from llmcourse.core.models import LoadedModel, load_model, save_hf
from llmcourse.core.progress import phase
from llmcourse.finetune.lora import (
    METHODS,
    LoraSettings,
    add_lora,
    peft_wrapping,
    prepare_full,
    resolve_targets,
    trainable_parameters,
)
from llmcourse.finetune.nf4 import nf4_bytes
from llmcourse.finetune.pref_data import (
    build_default_pairs,
    parse_pair,
    read_pairs,
    split_pairs,
    tokenize_pairs,
    write_pairs,
)
from llmcourse.finetune.pref_train import (
    PreferenceConfig,
    PreferenceObjective,
    disable_dropout,
    plot_rewards,
    precompute_reference,
)
from llmcourse.finetune.sft_data import (
    capital_question,
    default_split,
    load_sft_data,
    pack_rows,
    pad_rows,
    tokenize_all,
)
from llmcourse.finetune.trainer import (
    TrainConfig,
    TrainState,
    check_tensorboard,
    fingerprint,
    latest_checkpoint,
    plot_loss,
    train,
)

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune` did."""

    state: TrainState
    model: Any  # the trained model (PeftModel for lora/qlora)
    summary: dict[str, Any] = field(default_factory=dict)


def base_folder(lm: LoadedModel) -> str:
    """The folder an adapter's ``base_model_name_or_path`` should name (the model's own folder)."""
    return str(lm.path) if lm.path is not None and Path(lm.path).is_dir() else lm.spec


def prepare(lm: LoadedModel, method: str, lora: LoraSettings) -> nn.Module:
    """The model to train: LoRA / QLoRA adapters through PEFT, or every parameter (full)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    if lm.kind not in ("hf", "default", "hub"):
        raise UserError(f"--model {lm.spec} is a {lm.kind} model", "fine-tune a plain Hugging Face folder or 'default'")
    if method == "full":
        return prepare_full(lm.model)
    resolve_targets(lm.model, lora.targets)  # fail on a missing target before any work
    model = add_lora(lm.model, lora, method)
    model.peft_config["default"].base_model_name_or_path = base_folder(lm)
    return model


def rows_for(tokenizer: Any, examples: list, cfg: TrainConfig) -> list:
    toks = tokenize_all(tokenizer, examples, cfg.seq_len, cfg.full_loss)
    return pack_rows(toks, cfg.seq_len) if cfg.packing else pad_rows(toks)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def finetune(model_spec: str, data: str, method: str, lora: LoraSettings, cfg: TrainConfig,
             out: str | Path | None, resume: str | Path | None = None, dtype: str = "fp32",
             lm: LoadedModel | None = None, export: bool = True, show_progress: bool = True,
             score_default: bool = True, tensorboard: str | Path | None = None,
             preference: PreferenceConfig | None = None, pair_samples: int = 2) -> FinetuneResult:
    """Fine-tune ``model_spec`` on ``data`` and write ``out`` (see module docstring). ``method`` is what trains
    (lora, qlora, full); ``preference`` switches the objective from SFT to DPO / ORPO on preference pairs
    (``data``: TRL's JSONL formats, or ``default``: on-policy country pairs sampled from the model, ``pair_samples``
    answers per question, written to ``out/pairs.jsonl``). Every input is checked before anything is written.
    With the default data, the held-out capital accuracy is measured before and after (``score_default``).
    ``tensorboard``: a folder for TensorBoard event logs (loss, learning rate, tokens/s)."""
    t0 = time.perf_counter()
    if out is not None:
        check_not_input(out, [model_spec if model_spec != "default" else None, data if data != "default" else None])
    if tensorboard is not None:
        check_tensorboard()  # before any work
    if preference is None:
        train_ex, eval_ex = load_sft_data(data, seed=cfg.seed)
    else:
        train_ex, eval_ex = ([], []) if data == "default" else split_pairs(read_pairs(data), seed=cfg.seed)
    if not train_ex and not (preference is not None and data == "default"):
        raise UserError(f"--data {data} has no training examples", "add examples")
    lm = lm or load_model(model_spec, dtype)
    bytes_fp32 = nf4_bytes(lm.model)
    pair_stats, built_pairs = None, None
    if preference is None:
        with phase(f"tokenizing {len(train_ex) + len(eval_ex)} examples"):
            train_rows = rows_for(lm.tokenizer, train_ex, cfg)
            eval_rows = rows_for(lm.tokenizer, eval_ex, cfg)
    else:
        if data == "default":
            built_pairs, pair_stats = build_default_pairs(lm.model, lm.tokenizer, samples=pair_samples,
                                                          seed=cfg.seed, show_progress=show_progress)
            if not built_pairs:
                raise UserError("the model answered every sampled question right: no default pairs",
                                "raise --pair-samples or pass your own --data pairs.jsonl")
            train_ex, eval_ex = split_pairs([parse_pair(p, f"default pair {i + 1}")
                                             for i, p in enumerate(built_pairs)], seed=cfg.seed)
        with phase(f"tokenizing {len(train_ex) + len(eval_ex)} preference pairs"):
            train_rows = tokenize_pairs(lm.tokenizer, train_ex, cfg.seq_len)
            eval_rows = tokenize_pairs(lm.tokenizer, eval_ex, cfg.seq_len)
    if not train_rows:
        raise UserError(f"no example of --data {data} has a response token within --seq-len {cfg.seq_len}",
                        "raise --seq-len or check the data")
    score = data == "default" and score_default
    before = None
    if score:
        with phase("held-out capital questions, before"):
            before = capital_accuracy(lm.model, lm.tokenizer)
    torch.manual_seed(cfg.seed)  # LoRA's A initialisation and dropout
    with phase(f"preparing the {method} model"):
        model = prepare(lm, method, lora)
    objective = None
    if preference is not None:
        disable_dropout(model)
        if method == "full" and preference.method == "dpo":
            preference.precompute_ref = True  # the reference must not be a second copy of the weights
        if preference.method == "dpo" and preference.precompute_ref:
            precompute_reference(model, train_rows + eval_rows, cfg.batch_size)
        objective = PreferenceObjective(preference)
    if resume is not None:
        ck = latest_checkpoint(resume)
        meta = json.loads((ck / "state.json").read_text())
        if meta.get("fingerprint") != json.loads(json.dumps(fingerprint(model))):
            raise UserError(f"checkpoint {ck} was made for another model or method",
                            "resume with the same --model, --method and LoRA settings, or start a new --out")
    n_train, n_total = trainable_parameters(model)
    meta = {"model": model_spec, "method": method, "lora": asdict(lora) if method != "full" else None,
            "preference": asdict(preference) if preference is not None else None}
    outp = Path(out) if out is not None else None
    if outp is not None:
        outp.mkdir(parents=True, exist_ok=True)
        if built_pairs is not None:
            write_pairs(outp / "pairs.jsonl", built_pairs)
    state = train(model, train_rows, eval_rows, cfg, pad_id(lm.tokenizer), outp, resume, meta, show_progress,
                  tensorboard, objective)
    summary: dict[str, Any] = {
        "model": model_spec, "method": method, "data": data, "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "rows": len(train_rows), "steps": state.step,
        "trainable_parameters": n_train, "parameters": n_total, "tokens": state.tokens,
        "tokens_per_s": state.tokens / max(state.seconds, 1e-9), "train_seconds": state.seconds,
        "first_loss": state.metrics[0]["loss"] if state.metrics else None,
        "last_loss": state.metrics[-1]["loss"] if state.metrics else None,
        "eval_loss": state.metrics[-1].get("eval_loss") if state.metrics else None,
        "model_bytes": nf4_bytes(model), "model_bytes_fp32": bytes_fp32,
        "config": asdict(cfg), "lora": meta["lora"],
    }
    if preference is not None:
        last = state.metrics[-1] if state.metrics else {}
        summary.update(objective=preference.method, preference=asdict(preference), pairs=pair_stats,
                       final_metrics={k: v for k, v in last.items() if "/" in k or k in ("log_odds_ratio", "nll_loss")})
    if tensorboard is not None:
        summary["tensorboard"] = str(tensorboard)
    if before is not None:
        with phase("held-out capital questions, after"):
            after = capital_accuracy(model, lm.tokenizer)
        summary["held_out_accuracy"] = {"before": before["accuracy"], "after": after["accuracy"],
                                        "questions": after["questions"], "rows_after": after["rows"]}
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                 and torch.distributed.get_rank() > 0)
    if outp is not None and export and rank0:
        what = f"{preference.method} ({method})" if preference is not None else method
        plot_loss(state.metrics, outp / "loss.png", f"{what} fine-tuning of {model_spec}")
        if preference is not None:
            plot_rewards(state.metrics, outp / "rewards.png", f"{what} of {model_spec}: implicit rewards")
        with phase(f"saving {'the model' if method == 'full' else 'the adapter and the merged model'} to {outp}"):
            summary.update(export_model(model, lm, method, outp))
    summary["seconds"] = time.perf_counter() - t0
    if outp is not None and rank0:
        write_json(outp / "summary.json", summary)
    return FinetuneResult(state, model, summary)


def export_model(model: nn.Module, lm: LoadedModel, method: str, out: Path) -> dict[str, Any]:
    """Write ``out/adapter`` (LoRA / QLoRA) and ``out/merged``; return their paths."""
    paths: dict[str, Any] = {}
    if method == "full":
        with atomic_dir(out / "merged") as tmp:
            save_hf(model, lm.tokenizer, tmp)
        paths["merged"] = str(out / "merged")
        return paths
    with atomic_dir(out / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
    paths["adapter"] = str(out / "adapter")
    base = model.peft_config["default"].base_model_name_or_path
    merged, tok = merge_adapter(base, out / "adapter")
    with atomic_dir(out / "merged") as tmp:
        save_hf(merged, tok, tmp)
    paths["merged"] = str(out / "merged")
    return paths


def merge_adapter(base: str, adapter: str | Path, dtype: str = "fp32") -> tuple[nn.Module, Any]:
    """(merged model, tokenizer): ``adapter`` applied to the fp32 ``base`` with PEFT and merged
    (``merge_and_unload``), as the course merges a QLoRA adapter into the fp16 base."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)",
                        "pass the adapter/ folder written by llmcourse finetune")
    lm = load_model(base, dtype)
    try:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(lm.model, str(adapter))
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"adapter {adapter} does not fit the model {base} ({type(e).__name__}: {str(e)[:150]})",
                        "pass the --model the adapter was trained on") from e
    merged = peft_model.merge_and_unload()
    return merged.eval(), lm.tokenizer


# ---------------------------------------------------------------- held-out score


@torch.no_grad()
def capital_accuracy(model: nn.Module, tokenizer: Any, countries: list[dict[str, str]] | None = None,
                     batch: int = 16) -> dict[str, Any]:
    """Held-out countries whose capital the model completes greedily after "The capital of X is" (see module)."""
    countries = countries if countries is not None else default_split()[1]
    was = model.training
    model.eval()
    correct, rows = 0, []
    for i in range(0, len(countries), batch):
        chunk = countries[i:i + batch]
        seqs, spans = [], []
        for c in chunk:
            prompt = chat_ids(tokenizer, [{"role": "user", "content": capital_question(c["name"])}]) or \
                tokenizer(capital_question(c["name"]), add_special_tokens=False)["input_ids"]
            prefix = list(prompt) + tokenizer(f"The capital of {c['name']} is",
                                                           add_special_tokens=False)["input_ids"]
            answer = tokenizer(f" {c['capital']}", add_special_tokens=False)["input_ids"]
            seqs.append(prefix + answer)
            spans.append((len(prefix), len(answer)))
        T = max(len(s) for s in seqs)
        pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), T), pid, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for b, (c, (p, n)) in enumerate(zip(chunk, spans, strict=True)):
            pred = logits[b, p - 1:p - 1 + n].argmax(-1)
            ok = bool((pred == ids[b, p:p + n]).all())
            correct += ok
            rows.append({"country": c["name"], "capital": c["capital"], "correct": ok,
                         "predicted": tokenizer.decode(pred).strip()})
    model.train(was)
    return {"accuracy": correct / max(1, len(countries)), "correct": correct, "questions": len(countries),
            "rows": rows}


def clone_model(lm: LoadedModel) -> LoadedModel:
    """A deep copy of ``lm`` (the tour's shared model must not change)."""
    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, lm.path, lm.kind, dict(lm.info))
