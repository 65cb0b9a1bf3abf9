"""Group pages list examples; a parser error names the subcommand's --help (issue 30)."""

from __future__ import annotations

import pytest

from llmcourse.cli import main


@pytest.mark.parametrize("group,example", [("quantize", "llmcourse quantize gptq --model default"),
                                           ("eval", "llmcourse eval perplexity --model default"),
                                           ("convert", "llmcourse convert hf --model")])
def test_group_pages_have_examples(group, example, capsys):
    with pytest.raises(SystemExit) as e:
        main([group, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and example in out
    assert f"llmcourse {group} KIND --help" in out


@pytest.mark.parametrize("argv,where", [
    (["quantize", "gptq", "--out", "x", "--no-such-flag"], "llmcourse quantize gptq --help"),
    (["quantize", "rtn", "--out", "x", "--bits", "four"], "llmcourse quantize rtn --help"),
    (["kg", "ask", "--db", "x", "q", "--no-such-flag"], "llmcourse kg ask --help"),
])
def test_parser_errors_point_to_the_subcommands_help(argv, where, capsys):
    pytest.importorskip("ladybug")
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"(see `{where}`)" in err[0], err
