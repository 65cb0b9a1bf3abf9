"""``finetune``'s flags are generated from its config dataclasses (TrainConfig, LoraSettings, PreferenceConfig):
a field's default lives in the dataclass only, and ``--preset`` fills in what the command line leaves unset."""

import dataclasses

import pytest

from llmcourse.cli import build_parser
from llmcourse.core.cli_common import config_from_args
from llmcourse.finetune.commands import objective, train_config
from llmcourse.finetune.lora import LoraSettings
from llmcourse.finetune.pref_train import PreferenceConfig
from llmcourse.finetune.trainer import PRESETS, TrainConfig


def parse(*argv: str):
    return build_parser(["finetune"]).parse_args(["finetune", "--out", "x", *argv])


@pytest.mark.parametrize("cls", [TrainConfig, LoraSettings, PreferenceConfig])
def test_every_documented_field_is_a_flag(cls, capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            assert flag in help_text, flag


def test_defaults_come_from_the_dataclasses():
    args = parse()
    assert train_config(args) == TrainConfig()
    assert config_from_args(LoraSettings, args) == LoraSettings()
    assert LoraSettings().alpha == 2 * LoraSettings().r  # alpha's default: 2 r
    adapter, pref = objective(parse("--method", "dpo"))
    assert adapter == "lora" and pref == PreferenceConfig(method="dpo")


def test_flags_and_preset():
    args = parse("--preset", "course", "--lr", "1e-3", "--lora-r", "8", "--targets", "q_proj, v_proj", "--dora",
                 "--max-steps", "7", "--packing")
    cfg = train_config(args)
    assert cfg.lr == 1e-3 and cfg.max_steps == 7 and cfg.packing  # given on the command line
    assert all(getattr(cfg, k) == v for k, v in PRESETS["course"].items() if k != "lr")  # the preset's
    lora = config_from_args(LoraSettings, args)
    assert (lora.r, lora.alpha, lora.targets, lora.dora) == (8, 16.0, ["q_proj", "v_proj"], True)
    _, pref = objective(parse("--method", "orpo", "--orpo-lambda", "0.3", "--beta", "0.2"))
    assert (pref.method, pref.orpo_lambda, pref.beta) == ("orpo", 0.3, 0.2)


def test_a_bad_value_is_argparse_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--batch-size", "0")
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
