"""SFT data, packing, LoRA through PEFT, merging, checkpoints and bad input (tiny models, default tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from ft_helpers import base_dir, chat_jsonl, small_model, tok  # noqa: F401  (fixtures)

from llmcourse.cli import main
from llmcourse.core.errors import UserError
from llmcourse.finetune.lora import LoraSettings, add_lora, merge, resolve_targets
from llmcourse.finetune.nf4 import NF4Linear
from llmcourse.finetune.run import finetune
from llmcourse.finetune.sft_data import (
    IGNORE,
    collate,
    load_sft_data,
    pack_rows,
    pad_rows,
    read_jsonl,
    tokenize_all,
    tokenize_example,
)
from llmcourse.finetune.trainer import TrainConfig, loss_sum, train

peft = pytest.importorskip("peft")


def _examples(tok, n=6):  # noqa: F811
    train_ex, _ = load_sft_data("default")
    return tokenize_all(tok, train_ex[:n], 256)


def test_prompt_tokens_are_ignored(tok):  # noqa: F811
    msgs = [{"role": "user", "content": "What is the capital of Peru?"},
            {"role": "assistant", "content": "The capital of Peru is Lima."}]
    t = tokenize_example(tok, msgs, 256)
    learned = tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE])
    assert learned.startswith("The capital of Peru is Lima.") and "Peru?" not in learned
    prompt_len = len(tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
                     ["input_ids"])
    assert all(lab == IGNORE for lab in t.labels[:prompt_len]) and t.labels[prompt_len] != IGNORE
    full = tokenize_example(tok, msgs, 256, full_loss=True)
    assert full.labels[1:] == full.input_ids[1:] and full.labels[0] == IGNORE


def test_packed_samples_do_not_see_each_other(tok):  # noqa: F811
    model = small_model()
    ex = _examples(tok)
    rows = pack_rows(ex, 256)
    assert len(rows) < len(ex)
    packed = collate(rows, tok.pad_token_id, packed=True)
    padded = collate(pad_rows(ex), tok.pad_token_id, packed=False)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits
        k, off = 0, 0
        for b, r in enumerate(rows):
            off = 0
            for _ in range(r.segments[-1]):
                n = len(ex[k].input_ids)
                alone = model(input_ids=torch.tensor([ex[k].input_ids])).logits[0]
                torch.testing.assert_close(logits[b, off:off + n], alone, atol=1e-5, rtol=1e-5)
                off, k = off + n, k + 1
        ls, n1 = loss_sum(model, packed)
        lu, n2 = loss_sum(model, padded)
    assert n1 == n2 and k == len(ex)
    torch.testing.assert_close(ls / n1, lu / n2, atol=1e-5, rtol=1e-5)


def test_our_loss_equals_transformers_loss(tok):  # noqa: F811
    model = small_model()
    b = collate(pad_rows(_examples(tok, 4)), tok.pad_token_id, packed=False)
    with torch.no_grad():
        s, n = loss_sum(model, b)
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(s / n, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_layer_is_the_formula(rslora):
    model = small_model()
    s = LoraSettings(r=4, alpha=8, dropout=0.0, targets=["q_proj"], rslora=rslora)
    pm = add_lora(model, s)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 64)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + s.scale * x @ A.t() @ B.t()
    assert s.scale == (8 / 2 if rslora else 8 / 4)
    torch.testing.assert_close(layer(x), expected)


def _cfg(**kw):
    base = dict(batch_size=2, lr=5e-3, warmup_ratio=0.1, max_steps=6, seq_len=64, eval_every=3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_only_lora_trains_and_the_base_is_unchanged(tok):  # noqa: F811
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    rows = pad_rows(_examples(tok, 8))
    state = train(pm, rows, rows[:2], _cfg(), tok.pad_token_id, show_progress=False)
    assert state.metrics[-1]["loss"] < state.metrics[0]["loss"]  # loss falls
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in pm.named_parameters()
             if "lora_" not in n}
    for n, w in before.items():
        assert torch.equal(after[n], w), n  # bit-identical
    assert any(not torch.equal(p, lora_before[n]) for n, p in pm.named_parameters() if p.requires_grad)


def _check_tensorboard(log_dir, metrics):
    """The event log holds the metrics.jsonl curve: loss, learning rate, tokens/s per step, eval loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(log_dir)).Reload()
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/tokens_per_s", "tokens_per_s")):
        got = [(e.step, e.value) for e in ev.Scalars(tag)]
        assert [s for s, _ in got] == [m["step"] for m in metrics], tag
        assert all(abs(v - m[key]) <= 1e-5 * max(1.0, abs(m[key])) for (_, v), m in zip(got, metrics, strict=True))
    assert [e.step for e in ev.Scalars("eval/loss")] == [m["step"] for m in metrics if m.get("eval_loss") is not None]


def test_merge_adapter_roundtrip_and_resume(tok, base_dir, chat_jsonl, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    cfg = _cfg(save_every=2, max_steps=4, batch_size=3)
    lora = LoraSettings(r=4, alpha=8, dropout=0.1)
    r = finetune(str(base_dir), str(chat_jsonl), "lora", lora, cfg, out, show_progress=False,
                 tensorboard=out / "tb")
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4
    _check_tensorboard(out / "tb", metrics)
    # the adapter loads with PEFT on the base its config names
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([tokenize_all(tok, read_jsonl(chat_jsonl)[:1], 64)[0].input_ids])
    with torch.no_grad():
        a, m, t = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, r.model.eval()(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=0)
    torch.testing.assert_close(a, t, atol=1e-5, rtol=0)
    # resume from step 2 continues the same curve bit for bit (dropout 0.1 included)
    out2 = tmp_path / "ft2"
    r2 = finetune(str(base_dir), str(chat_jsonl), "lora", lora, cfg, out2, resume=out / "checkpoints" / "step-2",
                  show_progress=False)
    first = [(x["loss"], x["grad_norm"]) for x in r.state.metrics]
    second = [(x["loss"], x["grad_norm"]) for x in r2.state.metrics]
    assert first == second
    w1 = {n: p for n, p in r.model.named_parameters() if p.requires_grad}
    for n, p in r2.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, w1[n]), n
    # a checkpoint of another model is refused before anything is written
    with pytest.raises(UserError, match="another model"):
        finetune(str(base_dir), str(chat_jsonl), "lora", LoraSettings(r=8), cfg, tmp_path / "ft3",
                 resume=out, show_progress=False)
    assert not (tmp_path / "ft3").exists()


def test_qlora_trains_on_an_nf4_base(tok):  # noqa: F811
    model = small_model()
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers" in n and p.ndim == 2)
    pm = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, dora=True), method="qlora")
    nf4 = [m for m in pm.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 14  # 7 projections x 2 layers
    q_bytes = sum(b.numel() * b.element_size() for m in nf4 for b in m.buffers())
    assert q_bytes < 0.14 * fp32
    rows = pad_rows(_examples(tok, 8))
    state = train(pm, rows, rows[:2], _cfg(), tok.pad_token_id, show_progress=False)
    assert state.metrics[-1]["loss"] < state.metrics[0]["loss"]
    x = torch.tensor([rows[0].input_ids])
    with torch.no_grad():
        before = pm(input_ids=x).logits
        merged = merge(pm)
        torch.testing.assert_close(merged(input_ids=x).logits, before, atol=1e-4, rtol=0)


def test_bad_input(tmp_path, tok, base_dir, capsys):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"question": "x"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no examples"):
        read_jsonl(empty)
    with pytest.raises(UserError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(UserError, match="nope"):
        resolve_targets(small_model(), ["nope"])
    for argv, msg in [(["--data", str(bad)], "line 2"), (["--data", str(empty)], "no examples"),
                      (["--lora-r", "0"], "rank"), (["--targets", "nope"], "nope")]:
        out = tmp_path / "o"
        assert main(["finetune", "--model", str(base_dir), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_merge_bad_input(tmp_path, base_dir, capsys, monkeypatch):  # noqa: F811
    out, empty = tmp_path / "m", tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", "--model", str(base_dir), "--adapter", str(empty), "--out", str(out)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["merge", "--model", str(base_dir), "--adapter", str(empty), "--out", str(out),
                 "--push-to-hub", "me/model"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not out.exists()


def test_merge_writes_a_gguf_that_loads_back(tok, base_dir, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from llmcourse.core.models import load_model

    pm = add_lora(small_model(), LoraSettings(r=4, alpha=8, dropout=0.0))  # the weights of base_dir
    torch.manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero update, so the merge changes the weights
    pm.peft_config["default"].base_model_name_or_path = str(base_dir)
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--gguf", "f32", "--json"]) == 0
    gguf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["gguf"]
    assert gguf == str(tmp_path / "merged-f32.gguf")
    back = load_model(gguf).model.eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("The capital of Peru is Lima.")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        ref, got = merged(input_ids=ids).logits, back(input_ids=ids).logits
        assert (ref - base(input_ids=ids).logits).abs().max() > 1e-3  # the merge did change the model
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # a type the GGUF lab does not know: one line, and neither the folder nor a GGUF is left behind
    bad = tmp_path / "bad"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(bad),
                 "--gguf", "Q9_X"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Q9_X" in err and len(err.splitlines()) == 1
    assert not bad.exists() and not (tmp_path / "bad-gguf").exists()


def test_fused_lora_forward_and_grads_equal_peft():
    from peft.tuners.lora import Linear as PeftLoraLinear

    from llmcourse.finetune.fused import FusedLoraLinear

    pm = add_lora(small_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    layers = [m for m in pm.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 1000, (2, 9))
    pm.train()

    def run():
        out = pm(input_ids=ids).logits
        out.square().mean().backward()
        g = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        return out.detach(), g

    fused = run()
    for m in layers:
        m.__class__ = PeftLoraLinear
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], atol=1e-5, rtol=1e-5)
    for n in ref[1]:
        torch.testing.assert_close(fused[1][n], ref[1][n], atol=1e-6, rtol=1e-4)


def test_padding_free_and_checkpointing_give_the_padded_loss_and_grads(tok):  # noqa: F811
    from llmcourse.finetune.trainer import batch_tensors, set_checkpointing

    pm = add_lora(small_model(), LoraSettings(r=4, alpha=8, dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    rows = pad_rows(_examples(tok, 4))
    pm.train()
    results = []
    for pf, ckpt in ((False, False), (True, False), (True, True)):
        cfg = TrainConfig(padding_free=pf, gradient_checkpointing=ckpt)
        b = batch_tensors(rows, tok.pad_token_id, cfg)
        assert b["input_ids"].shape[0] == (1 if pf else 4)
        set_checkpointing(pm, ckpt)
        s, n = loss_sum(pm, b)
        (s / n).backward()
        results.append((float(s / n), {k: p.grad.clone() for k, p in pm.named_parameters() if p.requires_grad}))
        pm.zero_grad(set_to_none=True)
    set_checkpointing(pm, False)
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) < 1e-5
        for k, g in grads.items():
            torch.testing.assert_close(g, results[0][1][k], atol=1e-6, rtol=1e-4)
