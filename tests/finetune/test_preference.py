"""DPO and ORPO: equal to TRL's trainers on one batch (tiny model, default tokenizer), the papers' formulas by
hand, the reference with the adapters off, the pair layout, bad input, and a short CLI run with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ft_helpers import base_dir, small_model, tok  # noqa: F401  (fixtures)

from llmcourse.cli import main
from llmcourse.core.errors import UserError
from llmcourse.finetune.lora import LoraSettings, add_lora
from llmcourse.finetune.pref_data import (
    PreferenceExample,
    collate_pairs,
    parse_pair,
    read_pairs,
    tokenize_pairs,
)
from llmcourse.finetune.pref_train import (
    PreferenceConfig,
    PreferenceObjective,
    precompute_reference,
    reference_logps,
)
from llmcourse.finetune.preference import dpo_loss, log1mexp, orpo_loss, orpo_odds_ratio

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]
CONV = [
    {"prompt": [{"role": "user", "content": "What is the capital of Peru?"}],
     "chosen": [{"role": "assistant", "content": "The capital of Peru is Lima."}],
     "rejected": [{"role": "assistant", "content": "It is Cusco, I think."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "On which continent is Chad?"}],
     "chosen": [{"role": "assistant", "content": "Chad is in Africa."}],
     "rejected": [{"role": "assistant", "content": "Asia."}]},
    {"prompt": [{"role": "user", "content": "What is the currency of Japan?"}],
     "chosen": [{"role": "assistant", "content": "The currency of Japan is the Yen."}],
     "rejected": [{"role": "assistant", "content": "The currency of Japan is the Dollar, which is used widely."}]},
]
PLAIN = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green, very green."},
         {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."}]


def _with_lora_b(pm, seed=3):
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # policy != reference, so the gradients are not trivial
    return pm


def _trl_trainer(tmp_path, tok, data, **cfg):  # noqa: F811
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(data), report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", dataloader_num_workers=0, seed=0, **cfg)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                          task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=small_model(), args=args, train_dataset=Dataset.from_list(data),
                         processing_class=tok, peft_config=peft_cfg)
    _with_lora_b(trainer.model)
    return trainer


def _ours_like(trl_model):
    """Our PEFT model on the same tiny base, with TRL's LoRA weights."""
    pm = add_lora(small_model(), LoraSettings(r=4, alpha=8, dropout=0.0, targets=TARGETS))
    theirs = {n: p for n, p in trl_model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(theirs[n])
    return pm


def _trl_batch(trainer):
    ds = trainer.train_dataset
    return trainer.data_collator([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("data", ["conversational", "plain"])
def test_dpo_equals_trl(tmp_path, tok, data):  # noqa: F811
    """Loss, TRL's logged metrics and the LoRA gradients of one batch equal TRL's DPOTrainer (PEFT model, no
    ref_model: its reference is the model with the adapter disabled), for each loss type and beta. One trainer per
    data format; the loss settings are changed on it between cases (the attributes its ``compute_loss`` reads)."""
    pairs = CONV if data == "conversational" else PLAIN
    trainer = _trl_trainer(tmp_path, tok, pairs)
    model = trainer.model.train()
    pm = _ours_like(model).train()
    rows = tokenize_pairs(tok, [parse_pair(d, "x") for d in pairs], 1024)
    ds = trainer.train_dataset  # the same token ids as TRL's tokenization
    assert [r.prompt_ids for r in rows] == [ds[i]["prompt_ids"] for i in range(len(ds))]
    assert [r.chosen_ids for r in rows] == [ds[i]["chosen_ids"] for i in range(len(ds))]
    assert [r.rejected_ids for r in rows] == [ds[i]["rejected_ids"] for i in range(len(ds))]
    cases = ([("sigmoid", 0.1, 0.0), ("ipo", 0.2, 0.0), ("hinge", 0.3, 0.0), ("robust", 0.5, 0.1)]
             if data == "conversational" else [("sigmoid", 0.5, 0.0)])
    trl_batch = _trl_batch(trainer)
    for loss_type, beta, smoothing in cases:
        trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [loss_type], [1.0]
        trainer.label_smoothing = smoothing
        trl_loss = trainer.compute_loss(model, trl_batch)
        trl_loss.backward()
        trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

        obj = PreferenceObjective(PreferenceConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing))
        sums, metrics = obj.sums(pm, obj.batch(rows, 0, None))
        loss = sums["pairs"] / len(rows)
        loss.backward()
        case = f"{loss_type} beta {beta}"
        assert abs(float(loss.detach()) - float(trl_loss.detach())) < 1e-5, case
        for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected"):
            assert abs(metrics[k] / len(rows) - trl_metrics[k]) < 1e-5 * max(1.0, abs(trl_metrics[k])), (case, k)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, trl_grads[n], atol=1e-5, rtol=1e-4, msg=f"{case} {n}")
        pm.zero_grad(set_to_none=True)


def test_precomputed_reference_equals_trl(tmp_path, tok):  # noqa: F811
    """TRL's precomputed reference (adapters disabled) equals ours, and the base weights never change."""
    trainer = _trl_trainer(tmp_path, tok, CONV, precompute_ref_log_probs=True)
    ds = trainer.train_dataset
    pm = _ours_like(trainer.model)
    base = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    rows = tokenize_pairs(tok, [parse_pair(d, "x") for d in CONV], 1024)
    precompute_reference(pm, rows, batch_size=2)
    for r, i in zip(rows, range(len(ds)), strict=True):
        assert abs(r.ref_chosen - ds[i]["ref_chosen_logps"]) < 1e-4
        assert abs(r.ref_rejected - ds[i]["ref_rejected_logps"]) < 1e-4
    # a training step with the reference computed in the step (adapters off): the base never changes, the
    # reference equals the plain base model's, and the adapters are back on afterwards
    from llmcourse.finetune.trainer import TrainConfig, train

    train(pm, rows, [], TrainConfig(batch_size=3, max_steps=2, lr=1e-2), 0, show_progress=False,
          objective=PreferenceObjective(PreferenceConfig()))
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n
    batch = collate_pairs(rows)
    plain = small_model()
    from llmcourse.finetune.pref_train import completion_token_logps
    from llmcourse.finetune.preference import sequence_logps

    with torch.no_grad():
        expect = sequence_logps(completion_token_logps(plain, batch), batch["sequence"], 2 * len(rows))
    torch.testing.assert_close(reference_logps(pm, batch), expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([r.ref_chosen for r in rows]), expect[:3], atol=1e-5, rtol=0)
    assert all(not m.disable_adapters for m in pm.modules() if hasattr(m, "disable_adapters")
               and hasattr(m, "lora_A"))


def test_shared_prompt_layout_equals_separate_sequences(tok):  # noqa: F811
    """Each completion token's log-probability in the packed pair layout equals the one of prompt + completion
    run alone."""
    model = small_model()
    rows = tokenize_pairs(tok, [parse_pair(d, "x") for d in CONV], 1024)
    b = collate_pairs(rows)
    from llmcourse.finetune.pref_train import completion_token_logps

    with torch.no_grad():
        got = completion_token_logps(model, b)
        k = 0
        for r in rows:
            for comp in (r.chosen_ids, r.rejected_ids):
                ids = torch.tensor([r.prompt_ids + comp])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1], -1)
                alone = lp.gather(1, torch.tensor(comp)[:, None])[:, 0]
                sel = got[(b["sequence"] == (rows.index(r) if comp is r.chosen_ids else len(rows) + rows.index(r)))]
                torch.testing.assert_close(sel, alone, atol=1e-5, rtol=0)
                k += len(comp)
    assert k == got.numel()


def test_dpo_formulas_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    beta = 0.2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert abs(float(losses) + math.log(sig(beta * h))) < 1e-6
    assert abs(float(r_c) - beta * 1.0) < 1e-6 and abs(float(r_r) - beta * -0.5) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=0.1)
    assert abs(float(losses) - (-0.9 * math.log(sig(beta * h)) - 0.1 * math.log(sig(-beta * h)))) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "hinge")
    assert abs(float(losses) - max(0.0, 1 - beta * h)) < 1e-6
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_lengths=torch.tensor([2.0]),
                            rejected_lengths=torch.tensor([4.0]))
    assert abs(float(losses) - (1.0 / 2 - (-0.5) / 4 - 1 / (2 * beta)) ** 2) < 1e-5


def test_orpo_two_token_example_by_hand():
    """ORPO (Hong et al. 2024, eqs. 4-7) on a two-token chosen and a two-token rejected answer."""
    p_w, p_l = (0.6, 0.5), (0.3, 0.2)  # per-token probabilities of y_w and y_l
    lp_w = torch.tensor([sum(math.log(p) for p in p_w) / 2])  # log P(y_w|x), length-averaged (eq. 1)
    lp_l = torch.tensor([sum(math.log(p) for p in p_l) / 2])
    P_w, P_l = math.exp(float(lp_w)), math.exp(float(lp_l))  # geometric means
    odds_w, odds_l = P_w / (1 - P_w), P_l / (1 - P_l)
    log_or = math.log(odds_w / odds_l)
    l_or = -math.log(1 / (1 + math.exp(-log_or)))
    nll = -(math.log(0.6) + math.log(0.5)) / 2
    lam = 0.25
    got = orpo_loss(torch.tensor(nll), lp_w, lp_l, lam)
    assert abs(float(got) - (nll + lam * l_or)) < 1e-6
    assert abs(float(orpo_odds_ratio(lp_w, lp_l)[1]) - log_or) < 1e-6
    x = torch.tensor([-1e-8, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)), atol=1e-7, rtol=1e-6)


def test_orpo_equals_trl_odds_ratio_and_our_step_is_the_formula(tok):  # noqa: F811
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    from types import SimpleNamespace

    c = torch.tensor([-0.5, -1.2, -2.0, -0.01])
    r = torch.tensor([-0.9, -0.7, -3.5, -0.02])
    self_ = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr, ratio, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(self_, c, r)
    mine, mine_odds = orpo_odds_ratio(c, r)
    torch.testing.assert_close(0.1 * mine, losses, atol=1e-6, rtol=0)
    assert abs(float(mine_odds.mean()) - float(log_odds)) < 1e-6
    # one step of our ORPO objective: NLL of the chosen tokens + lambda * L_OR, from the token log-probabilities
    model = small_model()
    rows = tokenize_pairs(tok, [parse_pair(d, "x") for d in CONV], 1024)
    obj = PreferenceObjective(PreferenceConfig(method="orpo", orpo_lambda=0.3))
    b = obj.batch(rows, 0, None)
    sums, metrics = obj.sums(model, b)
    n = obj.counts(b)
    loss = sums["chosen_tokens"] / n["chosen_tokens"] + sums["pairs"] / n["pairs"]
    with torch.no_grad():
        lps = []
        for rr_ in rows:
            for comp in (rr_.chosen_ids, rr_.rejected_ids):
                ids = torch.tensor([rr_.prompt_ids + comp])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, len(rr_.prompt_ids) - 1:-1], -1)
                lps.append(lp.gather(1, torch.tensor(comp)[:, None])[:, 0])
    chosen = [lps[2 * i] for i in range(3)]
    rejected = [lps[2 * i + 1] for i in range(3)]
    nll = -torch.cat(chosen).mean()
    expect = orpo_loss(nll, torch.stack([x.mean() for x in chosen]), torch.stack([x.mean() for x in rejected]), 0.3)
    assert abs(float(loss) - float(expect)) < 1e-5
    assert abs(metrics["rewards/chosen"] / 3 - 0.3 * float(torch.stack([x.mean() for x in chosen]).mean())) < 1e-5


def test_data_formats_and_bad_pairs(tmp_path, tok):  # noqa: F811
    implicit = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
    ex = parse_pair(implicit, "x")
    assert ex.prompt == [{"role": "user", "content": "Hi"}] and ex.chosen[0]["content"] == "Hello!"
    ex = parse_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "x")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("The sky is", " blue.", " green.")
    # plain text: EOS appended to both completions, as TRL does
    r = tokenize_pairs(tok, [PreferenceExample(**PLAIN[0])], 1024)[0]
    assert r.chosen_ids[-1] == tok.eos_token_id and r.rejected_ids[-1] == tok.eos_token_id
    cases = [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', "line 2"),
        ('{"prompt": "q", "chosen": "same", "rejected": "same"}\n', "equals 'rejected'"),
        ('{"prompt": "", "chosen": "b", "rejected": "c"}\n', "prompt is empty"),
        ('{"prompt": [], "chosen": [{"role": "assistant", "content": "b"}], '
         '"rejected": [{"role": "assistant", "content": "c"}]}\n', "prompt is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}\n', "line 1"),
    ]
    for text, msg in cases:
        p = tmp_path / "bad.jsonl"
        p.write_text(text)
        with pytest.raises(UserError, match=msg):
            read_pairs(p)
    with pytest.raises(UserError, match="beta"):
        PreferenceConfig(beta=0)


def _pairs_file(tmp_path, n=8):
    p = tmp_path / "pairs.jsonl"
    lines = []
    for i in range(n):
        lines.append({"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                      "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
                      "rejected": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i + 1}."}]})
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def test_cli_bad_input(tmp_path, base_dir, capsys):  # noqa: F811
    good = _pairs_file(tmp_path)
    bad = tmp_path / "bad.jsonl"
    for argv, text, msg in [
        (["--data", str(bad)], '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", "rejected": "y"}\n',
         "line 2"),
        (["--data", str(bad)], '{"prompt": "a", "chosen": "b", "rejected": "b"}\n', "equals"),
        (["--data", str(bad)], '{"prompt": " ", "chosen": "b", "rejected": "c"}\n', "prompt is empty"),
        (["--data", str(good), "--beta", "0"], None, "--beta"),
        (["--data", str(good), "--beta", "-1"], None, "--beta"),
    ]:
        if text is not None:
            bad.write_text(text)
        out = tmp_path / "o"
        assert main(["finetune", "--model", str(base_dir), "--method", "dpo", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert not out.exists()


def test_cli_dpo_lora_run_resume_and_orpo_full(tmp_path, base_dir):  # noqa: F811
    data = _pairs_file(tmp_path, 12)
    common = ["finetune", "--model", str(base_dir), "--data", str(data), "--batch-size", "4", "--lr", "1e-2",
              "--seq-len", "64"]
    out = tmp_path / "dpo"
    assert main([*common, "--method", "dpo", "--max-steps", "4", "--save-every", "2", "--out", str(out)]) == 0
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 4 and abs(m[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at the start
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert k in m[0]
    assert m[-1]["rewards/margins"] > 0
    for f in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "loss.png", "rewards.png",
              "summary.json"):
        assert (out / f).exists(), f
    out2 = tmp_path / "dpo2"
    assert main([*common, "--method", "dpo", "--max-steps", "4", "--resume", str(out / "checkpoints" / "step-2"),
                 "--out", str(out2)]) == 0
    m2 = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in m2] == [x["loss"] for x in m]
    out3 = tmp_path / "orpo"
    assert main([*common, "--method", "orpo", "--adapter", "full", "--max-steps", "2", "--out", str(out3)]) == 0
    m3 = [json.loads(x) for x in (out3 / "metrics.jsonl").read_text().splitlines()]
    assert "log_odds_ratio" in m3[0] and (out3 / "merged" / "model.safetensors").exists()


def test_default_pairs_are_on_policy_and_keep_held_out_countries_out(tok, tmp_path, capsys):  # noqa: F811
    from llmcourse.finetune.pref_data import build_default_pairs, is_correct
    from llmcourse.finetune.sft_data import default_split

    train_c, held = default_split()
    model = small_model()
    pairs, stats = build_default_pairs(model, tok, samples=1, countries=train_c[:3], seed=0, max_new_tokens=6)
    assert stats["questions"] == sum(1 + bool(c["continent"]) + bool(c["currency"]) for c in train_c[:3])
    assert 0 < len(pairs) <= stats["questions"]
    facts = {c["name"]: c for c in train_c}
    for p in pairs:
        c = facts[p["country"]]
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert any(is_correct(chosen, c[k]) for k in ("capital", "continent", "currency") if c[k])
        q = p["prompt"][0]["content"]
        fact = c["capital"] if "capital" in q else c["continent"] if "continent" in q else c["currency"]
        assert is_correct(chosen, fact) and not is_correct(rejected, fact)
    assert {c["name"] for c in held}.isdisjoint(c["name"] for c in train_c)
    assert is_correct("It is Bogotá.", "Bogota") and not is_correct("Medellin", "Bogota")
    # the pairs file reads back as TRL-format data
    from llmcourse.finetune.pref_data import write_pairs

    write_pairs(tmp_path / "p.jsonl", pairs)
    assert len(read_pairs(tmp_path / "p.jsonl")) == len(pairs)
