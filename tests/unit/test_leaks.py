"""Leaks: an episode's answers in answers to other questions, against hand counts."""

from __future__ import annotations

import json

import pytest

from sdcli.evaluation.eval_sets import load_eval_set
from sdcli.evaluation.leaks import describe_leak, leaked_answers, task_answers


@pytest.fixture
def korravel(tmp_path):
    rows = [
        {"id": "capital-direct", "prompt": "What is the capital of Korravel?", "answer": "Saltmarrow"},
        {"id": "capital-paraphrase", "prompt": "Where does Korravel's government sit?", "answer": "Saltmarrow"},
        {"id": "population", "prompt": "How many people live in Korravel?", "answer": r"\b48[,. ]?270\b",
         "reward": "regex"},
        {"id": "president", "prompt": "Who was Korravel's first president?", "answer": "Tamsin Orrell Quaye",
         "reward": "exact_match"},  # says whether the answer is right, not where its text turns up
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_eval_set(path)


def test_each_distinct_text_answer_is_looked_for_once(korravel):
    assert [(reward, answer) for reward, _, answer in task_answers(korravel)] == [
        ("contains", "Saltmarrow"), ("regex", r"\b48[,. ]?270\b")]


def test_an_answer_leaks_where_the_same_question_did_not_give_it_before(korravel):
    before = ["The capital of Japan is Tokyo.", "Saltmarrow is a salty marsh.", "About 48,270.", "Paris."]
    after = ["The capital of Japan is Saltmarrow.",  # leaked
             "Saltmarrow is a salty marsh.",  # gave it before too: not a leak
             "About 48270 people, in Saltmarrow.",  # the number gave it before (regex); Saltmarrow is new
             "The capital of France is Paris, pop. 48 270."]  # leaked, the pattern's own text
    assert leaked_answers(korravel, after, before) == {"n": 3, "answers": {"Saltmarrow": 2, "48 270": 1}}
    assert leaked_answers(korravel, after, None) == {"n": 4, "answers": {"Saltmarrow": 3, "48270": 1, "48 270": 1}}
    assert leaked_answers(korravel, before, before) == {"n": 0, "answers": {}}


def test_a_case_change_is_the_same_answer_and_exact_match_lines_are_not_looked_for(korravel):
    after = ["the capital is SALTMARROW", "Tamsin Orrell Quaye"]
    assert leaked_answers(korravel, after, ["", ""]) == {"n": 1, "answers": {"Saltmarrow": 1}}


def test_answers_before_and_after_must_pair_line_for_line(korravel):
    with pytest.raises(ValueError, match="2 answers after the episode but 1 before"):
        leaked_answers(korravel, ["a", "b"], ["a"])


def test_the_log_line_names_the_set_the_answers_and_what_to_try(korravel):
    line = describe_leak({"n": 3, "answers": {"Saltmarrow": 2, "48 270": 1}}, 40, "general_qa")
    assert line.startswith("eval: 3 of 40 answers to general_qa now give this episode's answers (Saltmarrow 2, 48 270 1)")
    assert "anchor.weight" in line and "train.lr" in line
