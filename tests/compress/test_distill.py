"""Distillation: the losses against torch's KL, the loop's resume, and the command's refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from llmcourse.compress import DistillConfig, distill_model, drop_layers, kd_loss, paired_gap
from llmcourse.core.errors import UserError
from tests.conftest import tiny_model


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(10, 256, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_losses_are_the_kl_divergences(T):
    s, t = _logits(0), _logits(1)
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * T * T  # KL(p_teacher || q_student)
    rev = F.kl_div(lt, ls, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(kd_loss(s, t, "forward", T), fwd)
    torch.testing.assert_close(kd_loss(s, t, "reverse", T), rev)
    torch.testing.assert_close(kd_loss(s, t, "mix", T, 0.3), 0.3 * fwd + 0.7 * rev)
    assert float(kd_loss(t, t, "mix", T)) == pytest.approx(0, abs=1e-6)


def test_ce_weight_is_the_weighted_average_of_soft_and_hard_targets():
    from llmcourse.compress.distill import _step_loss

    student, teacher = _student_teacher()
    ids = _data()[0][:2]
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    V = s.shape[-1]
    kd = kd_loss(s.reshape(-1, V), t.reshape(-1, V), "forward", 2.0)
    ce = F.cross_entropy(s[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    with torch.no_grad():
        loss, parts = _step_loss(student, teacher, ids, DistillConfig(temperature=2.0, ce_weight=0.25))
    torch.testing.assert_close(loss, 0.75 * kd + 0.25 * ce)
    torch.testing.assert_close(parts["lm"], ce)
    torch.testing.assert_close(parts["kd"], kd)


def test_paired_gap():
    d, se = paired_gap([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])  # differences 0.5, 1, 1.5
    assert d == pytest.approx(1.0) and se == pytest.approx(0.5 / 3 ** 0.5)


def _student_teacher():
    teacher = tiny_model("llama", seed=9, num_hidden_layers=4)
    with torch.no_grad():  # peaked next-token distributions (a random model's are nearly uniform)
        teacher.lm_head.weight.mul_(5)
    student = tiny_model("llama", seed=10, num_hidden_layers=4)  # another model: far from the teacher
    drop_layers(student, [1, 2])
    return student, teacher


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (16, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)


def test_distillation_lowers_kl_and_resume_continues_the_same_run(tmp_path):
    train, held = _data()
    cfg = DistillConfig(tokens=4 * 2 * 32, batch_size=2, seq_len=32, lr=1e-2, eval_every=0, save_every=2,
                        ce_weight=0.0)
    student, teacher = _student_teacher()
    whole = distill_model(student, teacher, train, held, cfg, tmp_path / "a", show_progress=False)
    assert whole.steps == 4 and whole.tokens == 256
    assert whole.metrics[-1]["eval_kl"] < 0.97 * whole.metrics[0]["eval_kl"]
    # stop after step 2 (a run of the same config, cut short), then resume from its checkpoint
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", tmp_path / "b" / "checkpoints" / "step-2")
    student2, _ = _student_teacher()
    resumed = distill_model(student2, teacher, train, held, cfg, tmp_path / "b", resume=tmp_path / "b", show_progress=False)
    assert resumed.steps == 4 and len(resumed.metrics) == len(whole.metrics)
    for p, q in zip(whole.student.parameters(), resumed.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "eval_kl" in rows[-1]


def test_lm_baseline_and_lora_run():
    train, held = _data()
    student, teacher = _student_teacher()
    res = distill_model(student, teacher, train, held, DistillConfig(loss="lm", tokens=128, batch_size=2, seq_len=32),
                  show_progress=False)
    assert "lm" in res.metrics[1] and "eval_kl" in res.metrics[-1]  # the teacher is only measured against
    student, teacher = _student_teacher()
    res = distill_model(student, teacher, train, held, DistillConfig(method="lora", hidden_weight=1.0, tokens=128,
                                                               batch_size=2, seq_len=32), show_progress=False)
    assert "hidden" in res.metrics[1] and not hasattr(res.student, "peft_config")  # merged back into a plain model


def test_refusals():
    train, held = _data()
    student, teacher = _student_teacher()
    other = tiny_model("llama", seed=1, vocab_size=300)
    with pytest.raises(UserError, match="vocabulary"):
        distill_model(student, other, train, held, DistillConfig(tokens=64, batch_size=2, seq_len=32), show_progress=False)
    with pytest.raises(UserError, match="fewer than --batch-size"):  # one window cannot fill a batch of 2
        distill_model(student, teacher, train[:1], held, DistillConfig(tokens=64, batch_size=2, seq_len=32),
                      show_progress=False)
    for bad in (dict(temperature=0), dict(mix=1.5), dict(loss="js"), dict(tokens=0), dict(ce_weight=1.5)):
        with pytest.raises(UserError):
            DistillConfig(**bad)


def test_distill_command_refuses_bad_pairs_and_leaves_nothing(tmp_path, capsys):
    from llmcourse.cli import main
    from tests.compress.test_structured import _tiny_folder

    src = _tiny_folder(tmp_path, layers=2)
    other = tmp_path / "other"
    tiny_model("llama", seed=1, vocab_size=256).save_pretrained(other)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(other)
    capsys.readouterr()
    bad = tmp_path / "bad"
    for flags in (["--student-from", str(src), "--drop-layers", "2"], ["--student-from", str(src), "--drop-layers", "0,1"],
                  ["--student", str(other)], ["--student-from", str(src)], ["--student-from", str(src),
                                                                             "--drop-layers", "1", "--temperature", "0"]):
        assert main(["distill", "--teacher", str(src), *flags, "--out", str(bad), "--samples", "2",
                     "--calib-seq-len", "32", "--threads", "1"]) == 2
        assert not bad.exists()
    err = capsys.readouterr().err
    assert err.count("llmcourse: error:") == 5 and len(err.strip().splitlines()) == 5
    assert "vocabularies" in err and "leaves none" in err


def test_two_processes_give_the_one_process_run(tmp_path, capsys):
    """``--processes 2`` (torchrun, gloo): the same losses, gradient norms, held-out measurements and weights as one
    process with the same global batch (3 windows: shares of 2 and 1, so the weighting by share is exercised)."""
    from safetensors.torch import load_file

    from llmcourse.cli import main
    from tests.compress.test_structured import _tiny_folder

    src = _tiny_folder(tmp_path, layers=3)
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"word{i % 97} and {i}" for i in range(600)))
    common = ["distill", "--teacher", str(src), "--student-from", str(src), "--drop-layers", "1", "--samples", "2",
              "--calib-seq-len", "32", "--data", str(data), "--tokens", str(3 * 3 * 32), "--batch-size", "3",
              "--seq-len", "32", "--lr", "1e-3", "--warmup-ratio", "0", "--ce-weight", "0.5", "--eval-every", "2",
              "--eval-windows", "3", "--threads", "1", "--json"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--processes", "2", "--out", str(tmp_path / "two")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["processes"] == 2
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "kd", "lm", "grad_norm", "eval_nll", "eval_kl", "eval_top1"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        if "eval_window_nll" in a:
            torch.testing.assert_close(torch.tensor(b["eval_window_nll"]), torch.tensor(a["eval_window_nll"]))
    w1, w2 = (load_file(tmp_path / d / "student" / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
