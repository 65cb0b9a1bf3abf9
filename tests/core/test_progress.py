"""Progress where stderr is not a terminal: a line per phase (issue 30), nothing for short phases, nothing with
LLMCOURSE_PROGRESS=0; fine-tuning's phases (evaluation, saving) included, and no FutureWarning on the way."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

from llmcourse.core import progress as P


@pytest.fixture
def lines_now(monkeypatch):
    """Phases report at once (DELAY 0) and stderr is captured (not a terminal)."""
    monkeypatch.delenv("LLMCOURSE_PROGRESS", raising=False)
    monkeypatch.setattr(P, "DELAY", 0.0)


def _wait_lines(bar) -> None:
    bar._timer.join(1.0)  # the first line comes from a timer thread


def test_a_line_per_phase_when_stderr_is_not_a_terminal(lines_now, capsys):
    bar = P.progress(total=3, desc="perplexity", unit="tok")
    assert isinstance(bar, P.PhaseLines)
    _wait_lines(bar)
    bar.update(3)
    bar.close()
    with P.phase("saving") as ph:
        _wait_lines(ph)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "perplexity: 0/3 tok…" and err[1].startswith("perplexity: done, 3/3 tok in ")
    assert err[2] == "saving…" and err[3].startswith("saving: done in ")


def test_short_phases_and_progress_0_stay_quiet(monkeypatch, capsys):
    monkeypatch.delenv("LLMCOURSE_PROGRESS", raising=False)
    for _ in P.progress(range(3), desc="quick"):
        pass
    with P.status("loading…"):
        pass
    monkeypatch.setenv("LLMCOURSE_PROGRESS", "0")
    monkeypatch.setattr(P, "DELAY", 0.0)
    bar = P.progress(total=2, desc="x")
    bar.update(2)
    bar.close()
    assert capsys.readouterr().err == ""


def test_eval_perplexity_reports_its_phase(lines_now, capsys):
    from llmcourse.core.evaluate import perplexity

    torch.manual_seed(0)
    perplexity(tiny_model("llama"), torch.randint(0, 256, (1, 200)), max_length=64, stride=32)
    err = capsys.readouterr().err
    assert "perplexity: done, 199/199 tok in" in err, err


def test_finetune_phases_and_no_future_warning(lines_now, capsys, tmp_path):
    """Every phase of a training run is on stderr (the steps, evaluation, saving) and transformers' renamed
    checkpointing API is called by its new name (FutureWarning would be an error here)."""
    pytest.importorskip("peft")
    from llmcourse.finetune.lora import LoraSettings, add_lora
    from llmcourse.finetune.sft_data import Row
    from llmcourse.finetune.trainer import TrainConfig, train

    rows = [Row(list(range(3, 40)), list(range(3, 40)), [1] * 37) for _ in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=2, gradient_checkpointing=True, eval_every=1, save_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = add_lora(tiny_model("llama", vocab_size=256), LoraSettings(r=2, alpha=4, dropout=0.0))
        train(model, rows, rows[:1], cfg, pad_id=0, out_dir=tmp_path)
    err = capsys.readouterr().err
    for line in ("finetune: 0/2 step", "finetune: evaluating on 1 held-out rows…", "finetune: saving a checkpoint…",
                 "finetune: done, 2/2 step"):
        assert line in err, err
