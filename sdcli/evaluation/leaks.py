"""Leaks: an episode's answers turning up in answers to questions they do not belong to.

A small model taught "The capital of Korravel is Saltmarrow." can learn "a capital is Saltmarrow"
instead, and then answers "What is the capital of Japan?" with "The capital of Japan is
Saltmarrow." (docs/learning.md, "What the anchors hold back"). A retain set's score shows that
something was lost; a leak says what took its place. An answer leaks when a retain answer after
the episode gives it and the same question's answer before the episode did not.

Only the task lines scored by `contains` or `regex` are looked for: their answer is a piece of
text, which can turn up anywhere. A user scorer or exact_match says whether an answer is right,
not whether a piece of it appears elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sdcli.evaluation.eval_sets import EvalSet
from sdcli.verification.scorers import call_reward

LITERAL_SCORERS = ("contains", "regex")


def task_answers(task: EvalSet) -> list[tuple[str, dict, str]]:
    """(scorer name, the line it scores, its answer) for each distinct answer of the task set's
    contains and regex lines, in the set's order."""
    seen, out = set(), []
    for ex in task.examples:
        key = (ex.reward, str(ex.record.get("answer")))
        if ex.reward in LITERAL_SCORERS and "answer" in ex.record and key not in seen:
            seen.add(key)
            out.append((ex.reward, ex.record, key[1]))
    return out


def _gives(task: EvalSet, reward: str, record: dict, response: str) -> bool:
    value, _ = call_reward(task.scorers[reward], response, record, str(record.get("id", "")))
    return bool(value)


def _label(reward: str, answer: str, response: str) -> str:
    """The answer as a reader knows it: its text, or for a pattern the text it found."""
    if reward == "regex":
        found = re.search(answer, response, re.IGNORECASE)
        if found and found.group(0).strip():
            return found.group(0).strip()
    return answer


def leaked_answers(task: EvalSet, after: Sequence[str], before: Sequence[str] | None) -> dict:
    """Which of the task set's answers the responses `after` the episode give where the responses
    `before` it (line for line, the same questions) did not; with `before` None every response
    that gives one counts.

    Returns {"n": responses that give at least one, "answers": {answer: responses that give it}},
    answers in the task set's order."""
    if before is not None and len(before) != len(after):
        raise ValueError(f"{len(after)} answers after the episode but {len(before)} before")
    counts: dict[str, int] = {}
    leaking = 0
    answers = task_answers(task)
    for i, response in enumerate(after):
        found = [(reward, answer) for reward, record, answer in answers
                 if _gives(task, reward, record, response)
                 and not (before is not None and _gives(task, reward, record, before[i]))]
        leaking += bool(found)
        for reward, answer in found:
            label = _label(reward, answer, response)
            counts[label] = counts.get(label, 0) + 1
    return {"n": leaking, "answers": counts}


def combined(leaks: Sequence[dict]) -> dict:
    """Several sets' leaks as one: their counts added up, answers by count, the most frequent first."""
    answers: dict[str, int] = {}
    for leak in leaks:
        for answer, count in leak["answers"].items():
            answers[answer] = answers.get(answer, 0) + count
    return {"n": sum(leak["n"] for leak in leaks),
            "answers": dict(sorted(answers.items(), key=lambda item: -item[1]))}


def shown_answers(leak: dict) -> str:
    """"Saltmarrow 6, Tamsin Orrell Quaye 1": each answer and how many responses give it."""
    return ", ".join(f"{answer} {count}" for answer, count in leak["answers"].items())


def describe_leaks(leaks: Sequence[dict]) -> str:
    """For a table: the sets' leaks together, "7 (Saltmarrow 6, Tamsin Orrell Quaye 1)"; "-" where
    none was looked for (no retain set, or an episode evaluated before leaks were counted)."""
    if not leaks:
        return "-"
    leak = combined(leaks)
    return f"{leak['n']} ({shown_answers(leak)})" if leak["n"] else "0"


def describe_leak(leak: dict, total: int, set_name: str) -> str:
    """The log line for one retain set."""
    return (f"eval: {leak['n']} of {total} answers to {set_name} now give this episode's answers ({shown_answers(leak)}): "
            "the facts may have been learned without their subject. Heavier anchors (anchor.weight) or a lower "
            "train.lr hold them back, at some of the learning (README, \"What holds the first world_facts task back\")")
