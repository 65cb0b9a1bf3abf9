"""The benchmark tasks, written to give exactly the requests of lm-evaluation-harness 0.4.13.

Each task turns a document into lm-eval's ``multiple_choice`` requests: a list of ``(context, continuation)``
pairs, one per choice, the gold index and the choice strings whose lengths ``acc_norm`` divides by. The
prompts follow the task YAMLs and ``utils.py`` of lm-eval 0.4.13 (``lm_eval/tasks/...``):

==============  ==========================================================================  ============  ==========
task            context (``doc_to_text``) -> continuations (``" " + choice``)               split scored  metrics
==============  ==========================================================================  ============  ==========
hellaswag       ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``   validation    acc, acc_norm
                -> ``" " + preprocess(ending)``
arc_easy        ``"Question: {question}\\nAnswer:"`` -> ``" " + choices.text[i]``           test          acc, acc_norm
arc_challenge   the same                                                                    test          acc, acc_norm
piqa            ``"Question: {goal}\\nAnswer:"`` -> ``" " + sol1``, ``" " + sol2``           validation    acc, acc_norm
winogrande      *partial evaluation*: contexts ``sentence[:blank] + option_i``              validation    acc
                -> one continuation ``" " + sentence[blank + 1:].strip()``
mmlu_<subject>  ``"The following are multiple choice questions (with answers) about         test          acc
                {subject}.\\n\\n" + question.strip() + "\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"``
                -> ``" A"`` .. ``" D"``
==============  ==========================================================================  ============  ==========

HellaSwag's ``preprocess`` strips, turns ``" [title]"`` into ``". "``, drops every ``[...]`` and folds double
spaces. ``mmlu`` is lm-eval's group: its 57 subjects (or those of ``subjects=``), ``acc`` weighted by subject
size, the pooled standard error. ARC's test split is not among the wheel's Arrow folders; its documents come
from the pre-rendered request file ``oe_eval_tasks/arc_*/test_rc_5shot`` (question, choices and gold of each
test item; checked verbatim against the Arrow validation split for the validation items).

Few-shot contexts are rendered as lm-eval renders them without a chat template: ``description +
sum(shot_text + " " + shot_answer + "\\n\\n") + text``; only MMLU ships its few-shot split (``dev``, the first
``k`` documents, lm-eval's ``first_n`` sampler), so ``num_fewshot > 0`` is refused for the other tasks.

``select(n, limit, seed)`` draws a seeded sample of document indices so that short runs stay comparable.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmcourse.core.errors import UserError
from llmcourse.evaluation.data import dataset_folder, read_arrow, read_requests

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
)
# the subjects a short MMLU run uses (`--tasks mmlu5`): one per lm-eval category, plus one more STEM subject
MMLU5: tuple[str, ...] = ("abstract_algebra", "anatomy", "high_school_geography", "marketing", "philosophy")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Example:
    """One document as lm-eval's multiple-choice requests."""

    task: str
    doc_id: int  # index in the task's split
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int
    choices: tuple[str, ...]  # doc_to_choice: acc_norm divides each log-likelihood by len(choice)


@dataclass(frozen=True)
class Task:
    """A benchmark: where its documents are, how a document becomes requests, what it reports."""

    name: str
    split: str
    source: str  # where the documents are read from (under the data root)
    metrics: tuple[str, ...]
    load: Callable[[], list[dict[str, Any]]]
    text: Callable[[dict[str, Any]], str]  # doc_to_text (the question part of the context)
    choices: Callable[[dict[str, Any]], list[str]]  # doc_to_choice
    gold: Callable[[dict[str, Any]], int]  # index of the right choice
    description: str = ""
    fewshot: Callable[[], list[dict[str, Any]]] | None = None  # the few-shot split (first_n)
    partial: bool = False  # winogrande: choices are contexts, the continuation is shared
    target: Callable[[dict[str, Any]], str] | None = None  # the shared continuation (partial tasks)
    group: str | None = None  # "mmlu" for its subjects

    def example(self, doc: dict[str, Any], doc_id: int, shots: list[dict[str, Any]] | None = None) -> Example:
        """``doc`` as lm-eval 0.4.13's requests (plain-text rendering, ``len(shots)``-shot)."""
        prefix = self.description
        for s in shots or []:
            if self.partial:
                q, a = self.choices(s)[self.gold(s)], self.target(s)  # type: ignore[misc]
            else:
                q, a = self.text(s), self.choices(s)[self.gold(s)]
            prefix += q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER
        choices = self.choices(doc)
        if self.partial:
            cont = TARGET_DELIMITER + self.target(doc)  # type: ignore[misc]
            requests = tuple((prefix + c, cont) for c in choices)
        else:
            ctx = prefix + self.text(doc)
            requests = tuple((ctx, TARGET_DELIMITER + c) for c in choices)
        gold = self.gold(doc)
        if not 0 <= gold < len(choices):
            raise UserError(f"{self.name} document {doc_id} has gold index {gold} for {len(choices)} choices",
                            "the data is corrupt: reinstall it")
        return Example(self.name, doc_id, requests, gold, tuple(choices))


# --- HellaSwag (lm_eval/tasks/hellaswag/utils.py) ------------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: strip, ``" [title]"`` -> ``". "``, drop ``[...]``, fold double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs() -> list[dict[str, Any]]:
    rows = read_arrow(dataset_folder("hellaswag/none/validation"), ("activity_label", "ctx_a", "ctx_b", "endings",
                                                                     "label"))
    return [{"query": hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
             "choices": [hellaswag_preprocess(e) for e in r["endings"]], "label": r["label"]} for r in rows]


# --- ARC (lm_eval/tasks/arc/arc_easy.yaml) ----------------------------------------------------------------------

def _arc_test_docs(task: str) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        out = []
        head, tail = "Question: ", "\nAnswer:"
        for d in read_requests(f"{task}/test_rc_5shot"):
            q = d.get("query", "")
            if not (isinstance(q, str) and q.startswith(head) and q.endswith(tail)):
                raise UserError(f"{task}'s test request file holds a query not shaped 'Question: ...\\nAnswer:'",
                                "reinstall the data")
            out.append({"id": d["id"], "question": q[len(head):-len(tail)], "choices": list(d["choices"]),
                        "gold": int(d["gold"])})
        return out
    return load


# --- MMLU (lm_eval/tasks/mmlu/default/_default_template_yaml) ---------------------------------------------------

def _mmlu_text(doc: dict[str, Any]) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu_split(subject: str, split: str) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        rows = read_arrow(dataset_folder(f"hails/mmlu_no_train/{subject}/{split}"), ("question", "choices", "answer"))
        bad = [i for i, r in enumerate(rows) if len(r["choices"]) != 4]
        if bad:
            raise UserError(f"mmlu_{subject} {split} document {bad[0]} has {len(rows[bad[0]]['choices'])} choices, "
                            "not 4", "reinstall the data")
        return rows
    return load


def _mmlu_task(subject: str) -> Task:
    return Task(
        name=f"mmlu_{subject}", split="test", source=f"hf_datasets/hails/mmlu_no_train/{subject}/test",
        metrics=("acc",), load=_mmlu_split(subject, "test"), text=_mmlu_text,
        choices=lambda d: ["A", "B", "C", "D"], gold=lambda d: int(d["answer"]),
        description=f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
                    "\n\n",
        fewshot=_mmlu_split(subject, "dev"), group="mmlu")


def _winogrande_docs() -> list[dict[str, Any]]:
    rows = read_arrow(dataset_folder("winogrande/winogrande_xl/validation"), ("sentence", "option1", "option2",
                                                                               "answer"))
    bad = [i for i, r in enumerate(rows) if "_" not in r["sentence"] or r["answer"] not in ("1", "2")]
    if bad:
        raise UserError(f"winogrande document {bad[0]} has no blank '_' or an answer other than 1/2",
                        "reinstall the data")
    return rows


def _blank(doc: dict[str, Any]) -> int:
    return doc["sentence"].index("_")


TASKS: dict[str, Task] = {
    "hellaswag": Task(
        name="hellaswag", split="validation", source="hf_datasets/hellaswag/none/validation",
        metrics=("acc", "acc_norm"), load=_hellaswag_docs, text=lambda d: d["query"], choices=lambda d: d["choices"],
        gold=lambda d: int(d["label"])),
    "arc_easy": Task(
        name="arc_easy", split="test", source="oe_eval_tasks/arc_easy/test_rc_5shot (test documents)",
        metrics=("acc", "acc_norm"), load=_arc_test_docs("arc_easy"),
        text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: d["choices"], gold=lambda d: d["gold"]),
    "arc_challenge": Task(
        name="arc_challenge", split="test", source="oe_eval_tasks/arc_challenge/test_rc_5shot (test documents)",
        metrics=("acc", "acc_norm"), load=_arc_test_docs("arc_challenge"),
        text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: d["choices"], gold=lambda d: d["gold"]),
    "piqa": Task(
        name="piqa", split="validation", source="hf_datasets/piqa/plain_text/validation",
        metrics=("acc", "acc_norm"),
        load=lambda: read_arrow(dataset_folder("piqa/plain_text/validation"), ("goal", "sol1", "sol2", "label")),
        text=lambda d: f"Question: {d['goal']}\nAnswer:", choices=lambda d: [d["sol1"], d["sol2"]],
        gold=lambda d: int(d["label"])),
    "winogrande": Task(
        name="winogrande", split="validation", source="hf_datasets/winogrande/winogrande_xl/validation",
        metrics=("acc",), load=_winogrande_docs, text=lambda d: "",
        choices=lambda d: [d["sentence"][:_blank(d)] + o for o in (d["option1"], d["option2"])],
        gold=lambda d: {"1": 0, "2": 1}[d["answer"]], partial=True,
        target=lambda d: d["sentence"][_blank(d) + 1:].strip()),
    **{f"mmlu_{s}": _mmlu_task(s) for s in MMLU_SUBJECTS},
}
GROUPS: dict[str, tuple[str, ...]] = {"mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
                                      "mmlu5": tuple(f"mmlu_{s}" for s in MMLU5)}


def known_tasks() -> str:
    """The task names a user may pass, in one line."""
    return ("hellaswag, arc_easy, arc_challenge, piqa, winogrande, mmlu (57 subjects), mmlu5 (5 subjects: "
            f"{', '.join(MMLU5)}), mmlu_<subject>")


def resolve(names: str | list[str]) -> tuple[list[Task], dict[str, list[str]]]:
    """The tasks named (comma-separated or a list; groups expanded) and the groups asked for -> their members."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise UserError("no task given", f"pass --tasks with some of: {known_tasks()}")
    tasks: dict[str, Task] = {}
    groups: dict[str, list[str]] = {}
    for n in items:
        if n in GROUPS:
            groups[n] = list(GROUPS[n])
            for m in GROUPS[n]:
                tasks.setdefault(m, TASKS[m])
        elif n in TASKS:
            tasks.setdefault(n, TASKS[n])
        else:
            raise UserError(f"unknown task {n!r}", f"known tasks: {known_tasks()}")
    return list(tasks.values()), groups


def select(n: int, limit: int | None, seed: int) -> list[int]:
    """Document indices to score: all ``n``, or a seeded sample of ``limit`` of them in index order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UserError(f"--limit {limit} scores nothing", "pass --limit >= 1, or leave it out for every document")
    return sorted(random.Random(seed).sample(range(n), limit))


@dataclass
class TaskData:
    """A task's selected examples (and how many documents its split has)."""

    task: Task
    examples: list[Example]
    n_docs: int
    docs: list[dict[str, Any]] = field(default_factory=list)  # the selected documents (raw, as read)


def build(task: Task, limit: int | None = None, seed: int = 0, num_fewshot: int = 0) -> TaskData:
    """Read ``task``'s split, draw the sample, and render each selected document's requests."""
    if num_fewshot < 0:
        raise UserError(f"--num-fewshot {num_fewshot} is negative", "pass 0 or more")
    docs = task.load()
    shots: list[dict[str, Any]] = []
    if num_fewshot:
        if task.fewshot is None:
            raise UserError(f"{task.name} has no few-shot split in the offline data (lm-eval samples its train "
                            "split, which the wheel does not ship)", "use --num-fewshot 0 for it")
        shots = task.fewshot()[:num_fewshot]
        if len(shots) < num_fewshot:
            raise UserError(f"{task.name}'s few-shot split has {len(shots)} documents", f"use --num-fewshot <= "
                            f"{len(shots)}")
    idx = select(len(docs), limit, seed)
    return TaskData(task, [task.example(docs[i], i, shots) for i in idx], len(docs), [docs[i] for i in idx])
