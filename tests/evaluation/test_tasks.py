"""Tasks: the requests of lm-eval 0.4.13's task definitions, on the offline data; seeded samples; bad data."""

from __future__ import annotations

import shutil

import pytest

from llmcourse.core.errors import UserError
from llmcourse.evaluation.data import ENV, data_root
from llmcourse.evaluation.tasks import (
    MMLU_SUBJECTS,
    TASKS,
    build,
    hellaswag_preprocess,
    known_tasks,
    resolve,
    select,
)


def test_hellaswag_preprocess_as_lm_eval():
    assert hellaswag_preprocess(" Making a cake: [header] How to bake [title] Mix the flour.  ") == \
        "Making a cake: How to bake. Mix the flour."
    d = build(TASKS["hellaswag"], limit=1, seed=0)
    assert d.n_docs == 10042
    ex = d.examples[0]
    assert len(ex.requests) == 4 and all(c.startswith(" ") for _, c in ex.requests)
    assert ex.requests[0][1] == " " + ex.choices[0]


def test_arc_test_split_prompts():
    d = build(TASKS["arc_easy"])
    assert d.n_docs == 2376 and build(TASKS["arc_challenge"], limit=1).n_docs == 1172
    ex = d.examples[0]  # ARC-Easy test, first item (Mercury_417466)
    assert ex.requests[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                              "food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert ex.gold == 0 and len(ex.choices) == 4


def test_piqa_and_winogrande_prompts():
    ex = build(TASKS["piqa"], limit=None).examples[0]
    assert ex.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(ex.requests) == 2 and ex.gold == 0
    ex = build(TASKS["winogrande"]).examples[0]  # "Sarah was a much better surgeon than Maria so _ always ..."
    assert [r[0] for r in ex.requests] == ["Sarah was a much better surgeon than Maria so Sarah",
                                           "Sarah was a much better surgeon than Maria so Maria"]
    assert {r[1] for r in ex.requests} == {" always got the easier cases."} and ex.gold == 1


def test_mmlu_prompt_and_fewshot():
    d = build(TASKS["mmlu_anatomy"], limit=2, seed=3)
    ctx = d.examples[0].requests[0][0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.endswith("\nD. " + d.docs[0]["choices"][3] + "\nAnswer:")
    assert [c for _, c in d.examples[0].requests] == [" A", " B", " C", " D"]
    shots = TASKS["mmlu_anatomy"].fewshot()
    ctx2 = build(TASKS["mmlu_anatomy"], limit=2, seed=3, num_fewshot=2).examples[0].requests[0][0]
    first = TASKS["mmlu_anatomy"].text(shots[0]) + " " + "ABCD"[shots[0]["answer"]] + "\n\n"
    assert ctx2.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n" + first)
    assert ctx2.endswith(ctx[len("The following are multiple choice questions (with answers) about anatomy.\n\n"):])
    with pytest.raises(UserError, match="few-shot"):
        build(TASKS["piqa"], limit=1, num_fewshot=1)


def test_resolve_and_groups():
    tasks, groups = resolve("piqa, mmlu")
    assert [t.name for t in tasks][:2] == ["piqa", "mmlu_abstract_algebra"] and len(tasks) == 1 + len(MMLU_SUBJECTS)
    assert groups == {"mmlu": [f"mmlu_{s}" for s in MMLU_SUBJECTS]}
    with pytest.raises(UserError) as e:
        resolve("hellaswag,lambada")
    assert "'lambada'" in str(e.value) and known_tasks() in str(e.value)


def test_seeded_sample():
    a = select(1000, 50, seed=1)
    assert a == select(1000, 50, seed=1) and a == sorted(a) and len(set(a)) == 50
    assert a != select(1000, 50, seed=2)
    assert select(10, 50, 0) == list(range(10)) and select(10, None, 0) == list(range(10))
    with pytest.raises(UserError, match="--limit"):
        select(10, 0, 0)


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    """A copy of the PIQA folder under a data root of our own."""
    src = data_root() / "hf_datasets" / "piqa" / "plain_text" / "validation"
    dst = tmp_path / "hf_datasets" / "piqa" / "plain_text" / "validation"
    shutil.copytree(src, dst)
    monkeypatch.setenv(ENV, str(tmp_path))
    return dst


def test_missing_and_corrupt_data(data_copy, tmp_path):
    assert build(TASKS["piqa"], limit=2).n_docs == 1838  # the copy reads
    with pytest.raises(UserError, match="missing"):
        build(TASKS["hellaswag"], limit=1)  # not in the copy
    arrow = data_copy / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable Arrow file"):
        build(TASKS["piqa"], limit=1)
    (data_copy / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json"):
        build(TASKS["piqa"], limit=1)
    with pytest.raises(UserError, match="request file"):
        build(TASKS["arc_easy"], limit=1)
