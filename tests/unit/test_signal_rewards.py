"""The rewards signal: loading data, choosing a successful sibling, masking, rendering."""

from __future__ import annotations

import json
import logging

import pytest

from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import RewardsSignal
from sdcli.signals.base import Example
from sdcli.signals.rewards import RewardsBuilder, sibling_solution, strip_thinking

TEMPLATE = "Q: {prompt}\nA correct answer: {solution}"


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def builder(**kw) -> RewardsBuilder:
    kw.setdefault("solution_template", TEMPLATE)
    return RewardsBuilder(RewardsSignal(**kw))


def example(prompt="What is 6*7?", answer=42, **fields) -> Example:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return Example(id="ex-1", prompt=messages, fields={"prompt": prompt, "answer": answer, **fields})


# --- loading ----------------------------------------------------------------------------------


def test_load_ids_prompts_and_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"prompt": "1+1?", "answer": 2},
            {
                "id": "custom",
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                "answer": "4",
                "level": 1,
            },
        ],
    )
    report = builder(reward="numeric").load(path)
    a, b = report.examples
    assert (a.id, b.id) == ("math.jsonl:1", "custom")
    assert b.prompt[0]["role"] == "system" and b.prompt[-1]["content"] == "2+2?"
    assert b.fields["level"] == 1 and b.fields["answer"] == "4"  # the whole line reaches the reward function


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine", "answer": 1},
            {"answer": 3},
            {"prompt": "no answer"},
            {"prompt": "not a number", "answer": "many"},
            {"prompt": "", "answer": 1},
            {"prompt": "bad id", "answer": 1, "id": ["x"]},
        ],
    )
    with pytest.raises(DataError) as info:
        builder(reward="numeric").load(path)
    text = str(info.value)
    assert "5 problem(s)" in text
    for line, words in [
        (2, "missing 'prompt'"),
        (3, "missing 'answer'"),
        (4, "not a single number"),
        (5, "empty"),
        (6, "'id'"),
    ]:
        assert f"bad.jsonl:{line}: " in text and words in text
    assert "bad.jsonl:1:" not in text


def test_invalid_json_is_reported_by_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "answer": 1}, "{not json"])
    with pytest.raises(DataError, match="broken.jsonl:2"):
        builder().load(path)


def test_duplicate_ids_are_a_warning(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"id": "a", "prompt": "x", "answer": 1}, {"id": "a", "prompt": "y", "answer": 2}]
    )
    report = builder().load(path)
    assert len(report.examples) == 2 and "already used on line 1" in report.warnings[0]


def test_a_user_reward_does_not_need_an_answer(tmp_path):
    path = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "Write a haiku."}])
    b = builder()
    b.cfg = b.cfg.model_copy(update={"reward": "mymodule:score"})  # load() only looks at the name
    assert len(b.load(path).examples) == 1


# --- siblings -----------------------------------------------------------------------------------


def test_sibling_is_the_best_other_success_and_never_self():
    responses = ["a", "b", "c", "d"]
    rewards = [1.0, 0.0, 1.0, 1.0]
    success = [True, False, True, True]
    assert sibling_solution(0, responses, rewards, success, strip=False) == "c"  # tie: earliest other
    assert sibling_solution(1, responses, rewards, success, strip=False) == "a"
    assert sibling_solution(2, responses, [0.9, 0.0, 1.0, 0.95], success, strip=False) == "d"  # highest reward
    assert sibling_solution(0, ["a", "b"], [1.0, 0.0], [True, False], strip=False) is None  # only itself


def test_strip_thinking():
    assert strip_thinking("<think>so 6*7</think>The answer is 42.") == "The answer is 42."
    assert strip_thinking("reasoning first</think>\nThe answer is 42.") == "The answer is 42."  # opened in the prompt
    assert strip_thinking("The answer is 42. <think>unfinished") == "The answer is 42."
    assert strip_thinking("A <THINK>x</THINK>B") == "A B"


# --- teacher views ----------------------------------------------------------------------------


def test_views_render_the_sibling_into_the_template():
    b = builder(reward="numeric")
    views = b.teacher_views(example(), ["The answer is 41.", "The answer is 42.", "6*7=42. The answer is 42."])
    assert [v.reward for v in views] == [0.0, 1.0, 1.0]
    assert [v.success for v in views] == [False, True, True]
    assert views[0].messages == [{"role": "user", "content": "Q: What is 6*7?\nA correct answer: The answer is 42."}]
    assert views[1].messages[-1]["content"].endswith("6*7=42. The answer is 42.")  # not itself
    assert views[2].messages[-1]["content"].endswith("A correct answer: The answer is 42.")
    assert all(v.masked_reason is None for v in views)


def test_history_is_kept_and_only_the_last_user_turn_changes():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}]
    views = builder(reward="numeric").teacher_views(example(history), ["42", "40"])
    assert views[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert views[1].messages[1]["content"] == "Q: What is 6*7?\nA correct answer: 42"


def test_no_successful_sibling_is_masked():
    views = builder(reward="numeric").teacher_views(example(), ["The answer is 42.", "The answer is 7.", "no idea"])
    assert views[0].messages is None and views[0].masked_reason == "no_successful_sibling" and views[0].reward == 1.0
    assert views[1].messages is not None  # the failures learn from the one success
    assert views[2].messages is not None


def test_skip_successful_masks_the_successes():
    views = builder(reward="numeric", skip_successful=True).teacher_views(example(), ["The answer is 42.", "41", "42"])
    assert [v.masked_reason for v in views] == ["skipped_successful", None, "skipped_successful"]
    assert views[1].messages[-1]["content"].endswith("The answer is 42.")


def test_strip_thinking_applies_to_the_sibling():
    responses = ["<think>6 times 7 is 42</think>The answer is 42.", "The answer is 40."]
    on = builder(reward="numeric").teacher_views(example(), responses)
    assert on[1].messages[-1]["content"].endswith("A correct answer: The answer is 42.")
    off = builder(reward="numeric", strip_thinking=False).teacher_views(example(), responses)
    assert "<think>6 times 7 is 42</think>" in off[1].messages[-1]["content"]


def test_a_sibling_that_is_all_thinking_is_passed_over():
    responses = ["<think>42</think>", "The answer is 42", "The answer is 40."]
    views = builder(reward="numeric").teacher_views(example(), responses)
    assert views[2].messages[-1]["content"].endswith("The answer is 42")


def test_success_threshold_and_a_user_scale():
    b = builder(success_threshold=0.5)
    b.reward_fn = lambda response, ex: len(response) / 10  # a user reward on its own scale
    views = b.teacher_views(example(), ["xx", "xxxxxxx"])
    assert [v.success for v in views] == [False, True]
    assert views[0].messages[-1]["content"].endswith("xxxxxxx")


def test_a_raising_reward_masks_that_sample_and_reports_id_and_message(caplog):
    def flaky(response, ex):
        if response == "boom":
            raise ValueError("cannot parse 'boom'")
        return 1.0

    b = builder()
    b.reward_fn = flaky
    with caplog.at_level(logging.WARNING):
        views = b.teacher_views(example(), ["fine", "boom", "also fine"])
    assert views[1].messages is None and views[1].masked_reason == "reward_error" and views[1].reward is None
    assert views[1].feedback.startswith("ex-1: ") and "ValueError: cannot parse 'boom'" in views[1].feedback
    assert "ex-1: " in caplog.text and "cannot parse 'boom'" in caplog.text
    assert views[0].messages is not None and views[2].messages is not None


def test_a_non_numeric_reward_masks_the_sample():
    b = builder()
    b.reward_fn = lambda response, ex: "correct"
    views = b.teacher_views(example(), ["a", "b"])
    assert all(v.masked_reason == "reward_error" and "a reward must be a number" in v.feedback for v in views)


def test_braces_in_prompts_and_answers_are_kept_verbatim():
    b = builder(reward="contains")
    views = b.teacher_views(example("Format {x} please", answer="{y}"), ["{y}", "nope"])
    assert views[1].messages[-1]["content"] == "Q: Format {x} please\nA correct answer: {y}"


def test_a_bad_user_reward_is_reported_by_check_not_by_construction():
    from sdcli.core.errors import RecipeError

    b = RewardsBuilder(RewardsSignal(reward="no_such_module_xyz:score"))  # `sd validate` builds it first
    with pytest.raises(RecipeError, match="module 'no_such_module_xyz' not found"):
        b.check()
    RewardsBuilder(RewardsSignal(reward="numeric")).check()  # built-ins are always fine
