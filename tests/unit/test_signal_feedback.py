"""The feedback signal: what the teacher sees for each sample, and when a sample is masked."""

from __future__ import annotations

import json
import logging
import os

import pytest

from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import FeedbackSignal, SandboxLimits
from sdcli.signals.base import Example
from sdcli.signals.feedback import NO_SOLUTION, FeedbackBuilder

FEEDBACK = "{prompt}\nFeedback: {feedback}"
SOLUTION = "{prompt}\nSolution: {solution}"


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def builder(results: dict[str, tuple], **kw) -> FeedbackBuilder:
    """A builder whose environment answers from `results`: response -> (reward, feedback)."""
    kw.setdefault("feedback_template", FEEDBACK)
    kw.setdefault("solution_template", SOLUTION)
    b = FeedbackBuilder(FeedbackSignal(**kw))
    b.environment = lambda response, ex: results[response]
    return b


def example(prompt="Write add(a, b).") -> Example:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return Example(id="tasks.jsonl:4", prompt=messages, fields={"prompt": prompt})


RESULTS = {
    "wrong": (0.0, "add(1, 2) gave -1, expected 3"),
    "half": (0.5, "1 of 2 tests passed"),
    "right": (1.0, ""),
    "right too": (1.0, None),
    "silent fail": (0.0, ""),
    "<think>hmm</think>right": (1.0, ""),
}


# --- teacher views ----------------------------------------------------------------------------


def test_feedback_alone_when_no_sibling_succeeded():
    views = builder(RESULTS).teacher_views(example(), ["wrong", "half"])
    assert views[0].messages == [
        {"role": "user", "content": "Write add(a, b).\nFeedback: add(1, 2) gave -1, expected 3"}
    ]
    assert (views[0].reward, views[0].success, views[0].feedback) == (0.0, False, "add(1, 2) gave -1, expected 3")
    assert views[1].messages[-1]["content"].endswith("Feedback: 1 of 2 tests passed")


def test_feedback_then_the_sibling_when_the_template_has_no_solution_field():
    views = builder(RESULTS).teacher_views(example(), ["wrong", "right"])
    # solution_template's {prompt} is the rendered feedback text: the prompt is not repeated
    assert views[0].messages[-1]["content"] == (
        "Write add(a, b).\nFeedback: add(1, 2) gave -1, expected 3\nSolution: right"
    )


def test_solution_template_without_prompt_is_appended():
    views = builder(RESULTS, solution_template="Solution: {solution}").teacher_views(example(), ["wrong", "right"])
    assert (
        views[0].messages[-1]["content"]
        == "Write add(a, b).\nFeedback: add(1, 2) gave -1, expected 3\n\nSolution: right"
    )


def test_template_with_a_solution_field():
    b = builder(RESULTS, feedback_template="{prompt}|{feedback}|{solution}")
    with_sibling = b.teacher_views(example(), ["wrong", "right"])
    assert with_sibling[0].messages[-1]["content"] == "Write add(a, b).|add(1, 2) gave -1, expected 3|right"
    alone = b.teacher_views(example(), ["wrong"])
    assert alone[0].messages[-1]["content"].endswith("|" + NO_SOLUTION)


def test_use_successful_sibling_off_shows_feedback_only():
    views = builder(RESULTS, use_successful_sibling=False).teacher_views(example(), ["wrong", "right"])
    assert views[0].messages[-1]["content"] == "Write add(a, b).\nFeedback: add(1, 2) gave -1, expected 3"
    assert views[1].masked_reason == "no_context"  # succeeded, no feedback, no sibling allowed


def test_success_without_feedback_gets_a_sibling_or_is_masked():
    views = builder(RESULTS).teacher_views(example(), ["right", "right too", "wrong"])
    assert views[0].messages[-1]["content"] == "Write add(a, b).\nSolution: right too"  # never itself
    assert views[1].messages[-1]["content"] == "Write add(a, b).\nSolution: right"
    assert views[0].feedback is None and views[0].success is True
    lone = builder(RESULTS).teacher_views(example(), ["right", "wrong"])
    assert lone[0].messages is None and lone[0].masked_reason == "no_context"


def test_a_passing_sample_with_feedback_is_not_told_it_failed():
    """An environment may report on success too ("3 of 3 passed"); the failure template would then
    tell the teacher that a passing attempt failed."""
    from sdcli.recipe.signal_sections import DEFAULT_FEEDBACK_TEMPLATE, DEFAULT_SUCCESS_FEEDBACK_TEMPLATE

    results = {"ok": (1.0, "3 of 3 tests passed"), "bad": (0.0, "add(1, 2) gave -1, expected 3")}
    b = FeedbackBuilder(FeedbackSignal(use_successful_sibling=False))
    b.environment = lambda response, ex: results[response]
    passed, failed = b.teacher_views(example(), ["ok", "bad"])
    assert passed.success is True and failed.success is False
    assert passed.messages[-1]["content"] == DEFAULT_SUCCESS_FEEDBACK_TEMPLATE.format(
        prompt="Write add(a, b).", feedback="3 of 3 tests passed")
    assert "failed" not in passed.messages[-1]["content"]
    assert failed.messages[-1]["content"] == DEFAULT_FEEDBACK_TEMPLATE.format(
        prompt="Write add(a, b).", feedback="add(1, 2) gave -1, expected 3")
    # a success below a reward of 1 counts by the threshold, and its own template is used
    custom = builder(RESULTS, success_threshold=0.5, success_template="{prompt}\nPassed: {feedback}")
    views = custom.teacher_views(example(), ["half", "wrong"])
    assert views[0].messages[-1]["content"] == "Write add(a, b).\nPassed: 1 of 2 tests passed"  # no passing sibling
    assert views[1].messages[-1]["content"] == "Write add(a, b).\nFeedback: add(1, 2) gave -1, expected 3\nSolution: half"


def test_skip_successful():
    views = builder(RESULTS, skip_successful=True).teacher_views(example(), ["right", "wrong", "right too"])
    assert views[0].masked_reason == "skipped_successful" and views[0].reward == 1.0
    assert views[2].masked_reason == "skipped_successful"
    assert views[1].messages[-1]["content"].endswith("Solution: right")


def test_failure_without_feedback_uses_the_sibling_or_is_masked():
    views = builder(RESULTS).teacher_views(example(), ["silent fail", "right"])
    assert views[0].messages[-1]["content"] == "Write add(a, b).\nSolution: right"
    alone = builder(RESULTS).teacher_views(example(), ["silent fail"])
    assert alone[0].masked_reason == "no_context"


def test_thinking_is_stripped_from_the_sibling():
    views = builder(RESULTS).teacher_views(example(), ["wrong", "<think>hmm</think>right"])
    assert views[0].messages[-1]["content"].endswith("Solution: right")
    kept = builder(RESULTS, strip_thinking=False).teacher_views(example(), ["wrong", "<think>hmm</think>right"])
    assert kept[0].messages[-1]["content"].endswith("Solution: <think>hmm</think>right")


def test_history_is_kept():
    history = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Write add(a, b)."}]
    views = builder(RESULTS).teacher_views(example(history), ["wrong"])
    assert views[0].messages[0] == history[0] and views[0].messages[1]["content"].startswith(
        "Write add(a, b).\nFeedback:"
    )


def test_an_environment_error_masks_that_sample_only(caplog):
    def env(response, ex):
        if response == "crash":
            raise RuntimeError("grader down")
        return RESULTS[response]

    b = builder(RESULTS)
    b.environment = env
    with caplog.at_level(logging.WARNING):
        views = b.teacher_views(example(), ["wrong", "crash", "right"])
    assert views[1].messages is None and views[1].masked_reason == "environment_error"
    assert views[1].feedback.startswith("tasks.jsonl:4: ") and "RuntimeError: grader down" in views[1].feedback
    assert "grader down" in caplog.text
    assert views[0].messages is not None  # the others go on as usual
    assert views[2].masked_reason == "no_context"  # the only success, with no feedback


def test_a_bad_return_value_masks_the_sample():
    b = builder(RESULTS)
    b.environment = lambda response, ex: 1.0
    views = b.teacher_views(example(), ["x"])
    assert views[0].masked_reason == "environment_error" and "expected (reward, feedback)" in views[0].feedback


def test_long_feedback_is_capped():
    b = builder({"wrong": (0.0, "x" * 5000)}, max_feedback_chars=200)
    views = b.teacher_views(example(), ["wrong"])
    assert len(views[0].feedback) == 200


# --- loading ----------------------------------------------------------------------------------


def test_load_python_tasks(tmp_path):
    path = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {"prompt": "Write add.", "entry_point": "add", "tests": [{"input": "add(1, 2)", "expected": "3"}]},
            {"id": "sq", "prompt": "Write square.", "test_code": "assert square(3) == 9"},
        ],
    )
    report = FeedbackBuilder(FeedbackSignal()).load(path)
    assert [e.id for e in report.examples] == ["tasks.jsonl:1", "sq"]
    assert report.examples[0].fields["entry_point"] == "add"


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    path = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {"prompt": "fine", "test_code": "assert True"},
            {"prompt": "no tests"},
            {"prompt": "bad input", "tests": [{"input": "f(", "expected": "1"}]},
            {"prompt": "bare string", "tests": [{"input": "f()", "expected": "hello"}]},
            {"tests": [{"input": "f()", "expected": "1"}]},
        ],
    )
    with pytest.raises(DataError) as info:
        FeedbackBuilder(FeedbackSignal()).load(path)
    text = str(info.value)
    for line, words in [
        (2, "needs 'tests'"),
        (3, "not a Python expression"),
        (4, "needs quotes"),
        (5, "missing 'prompt'"),
    ]:
        assert f"tasks.jsonl:{line}: " in text and words in text
    assert "tasks.jsonl:1:" not in text


def test_a_user_environment_needs_no_tests(tmp_path):
    path = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "Write a poem."}])
    b = FeedbackBuilder(FeedbackSignal())
    b.cfg = b.cfg.model_copy(update={"environment": "mymodule:judge"})  # load() only looks at the name
    assert len(b.load(path).examples) == 1


def test_solution_field_without_siblings_warns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "test_code": "assert True"}])
    cfg = FeedbackSignal(feedback_template="{prompt} {feedback} {solution}", use_successful_sibling=False)
    assert "use_successful_sibling is false" in FeedbackBuilder(cfg).load(path).warnings[0]


# --- end to end with the real python_tests environment --------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")
def test_python_tests_end_to_end(tmp_path):
    path = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {
                "prompt": "Write add(a, b).",
                "entry_point": "add",
                "tests": [{"input": "add(1, 2)", "expected": "3"}, {"input": "add(2, 2)", "expected": "4"}],
            }
        ],
    )
    b = FeedbackBuilder(FeedbackSignal(sandbox=SandboxLimits(wall_seconds=5)))
    ex = b.load(path).examples[0]
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    views = b.teacher_views(ex, [wrong, right])
    assert [v.reward for v in views] == [0.0, 1.0]
    teacher = views[0].messages[-1]["content"]
    assert "Expected: 3\nGot: -1" in teacher and "return a + b" in teacher
    assert views[1].masked_reason == "no_context"  # the only success: nothing to show it


def test_check_imports_a_user_environment_and_tries_the_sandbox():
    from sdcli.core.errors import RecipeError

    with pytest.raises(RecipeError, match="signal.environment"):
        FeedbackBuilder(FeedbackSignal(environment="no_such_module_xyz:judge")).check()
    if os.name == "posix":
        FeedbackBuilder(FeedbackSignal()).check()  # python_tests: runs print('ok') in the sandbox
