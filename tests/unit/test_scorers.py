"""Built-in reward functions, loading a user reward, and containing its errors."""

from __future__ import annotations

import math
import sys
import uuid

import pytest

from sdcli.core.errors import RecipeError, UserError
from sdcli.recipe.signal_sections import RewardsSignal
from sdcli.verification.scorers import (
    call_reward,
    check_answer,
    contains,
    exact_match,
    load_reward,
    normalize,
    numeric,
    parse_answer_number,
    parse_numbers,
    regex,
)


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def write_module(folder, source: str) -> str:
    """A uniquely named module in `folder` (so imports never hit a cached module); returns its name."""
    name = f"user_reward_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(source)
    return name


# --- built-ins ------------------------------------------------------------------------------


def test_normalize_strips_collapses_and_drops_trailing_period():
    assert normalize("  The   answer\n is 42. ") == "the answer is 42"
    assert normalize("Paris...", case_sensitive=True) == "Paris"


def test_exact_match_honours_case_sensitivity():
    assert exact_match(" paris. ", {"answer": "Paris"}) == 1.0
    assert exact_match("paris", {"answer": "Paris"}, case_sensitive=True) == 0.0
    assert exact_match("The answer is Paris", {"answer": "Paris"}) == 0.0
    assert exact_match("42", {"answer": 42}) == 1.0


@pytest.mark.parametrize(
    "text, numbers",
    [
        ("The answer is -1,250.", [-1250.0]),
        ("3-5", [3.0, 5.0]),
        ("$1,234.50 and 7", [1234.5, 7.0]),
        ("about 3/4 of it", [0.75]),
        ("x = -5", [-5.0]),
        ("12,345,678", [12345678.0]),
        ("1,2345", [1.0, 2345.0]),
        ("no numbers", []),
    ],
)
def test_parse_numbers(text, numbers):
    assert parse_numbers(text) == numbers


def test_numeric_compares_the_last_number_within_tolerance():
    ex = {"answer": 42}
    assert numeric("6 times 7 is 42. The answer is 42.", ex) == 1.0
    assert numeric("The answer is 42, not 41.", ex) == 0.0  # the last number counts
    assert numeric("The answer is 42.0000001", ex, tolerance=1e-3) == 1.0
    assert numeric("The answer is 42.1", ex, tolerance=1e-3) == 0.0
    assert numeric("I do not know.", ex) == 0.0
    assert numeric("It costs -1,250 dollars", {"answer": "-1250"}) == 1.0
    assert numeric("It costs 1250", {"answer": "1,250"}) == 1.0
    assert numeric("half: 1/2", {"answer": 0.5}) == 1.0


def test_parse_answer_number_rejects_non_numbers():
    assert parse_answer_number(" 3/4 ") == 0.75
    with pytest.raises(ValueError, match="not a single number"):
        parse_answer_number("twelve")
    with pytest.raises(ValueError, match="not a single number"):
        parse_answer_number("1 or 2")
    with pytest.raises(ValueError, match="must be a number"):
        parse_answer_number(True)


def test_regex_uses_the_pattern_or_else_the_answer():
    assert regex("The capital is PARIS", {"answer": r"\bparis\b"}) == 1.0
    assert regex("The capital is PARIS", {"answer": r"\bparis\b"}, case_sensitive=True) == 0.0
    assert regex("Answer: 12", {"answer": "ignored"}, pattern=r"Answer: \d+") == 1.0
    assert regex("Answer: twelve", {"answer": "ignored"}, pattern=r"Answer: \d+") == 0.0


def test_contains():
    assert contains("I think it is   Marie Curie, clearly.", {"answer": "marie curie"}) == 1.0
    assert contains("I think it is Marie Curie.", {"answer": "marie curie"}, case_sensitive=True) == 0.0
    assert contains("Pierre", {"answer": "Marie"}) == 0.0


def test_check_answer_explains_bad_lines():
    cfg = RewardsSignal(reward="numeric")
    assert check_answer("numeric", cfg, {"answer": "1,234"}) is None
    assert "missing 'answer'" in check_answer("numeric", cfg, {})
    assert "not a single number" in check_answer("numeric", cfg, {"answer": "lots"})
    assert "not a valid regular expression" in check_answer("regex", cfg, {"answer": "(unclosed"})
    assert check_answer("regex", RewardsSignal(reward="regex", pattern="x+"), {}) is None
    assert "must be a string or a number" in check_answer("exact_match", cfg, {"answer": [1]})
    assert "empty" in check_answer("contains", cfg, {"answer": "  "})


def test_load_reward_binds_the_recipe_options():
    fn = load_reward("numeric", RewardsSignal(reward="numeric", tolerance=0.5))
    assert fn("The answer is 10.4", {"answer": 10}) == 1.0
    fn = load_reward("exact_match", RewardsSignal(case_sensitive=True))
    assert fn("paris", {"answer": "Paris"}) == 0.0
    fn = load_reward("regex", RewardsSignal(reward="regex", pattern=r"^\d+$"))
    assert fn("123", {}) == 1.0


# --- user rewards ---------------------------------------------------------------------------


def test_load_user_reward(tmp_path):
    name = write_module(tmp_path, "def score(response, example):\n    return len(response) / 10\n")
    fn = load_reward(f"{name}:score", RewardsSignal(), search_dirs=[tmp_path])
    assert fn("abcde", {}) == 0.5


def test_load_user_reward_from_the_current_folder(tmp_path, monkeypatch):
    name = write_module(tmp_path, "def score(response, example, extra=1):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward(f"{name}:score", RewardsSignal())("x", {}) == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("exact-match", "did you mean 'exact_match'"),
        ("not a spec", "package.module:function"),
        ("mod:", "package.module:function"),
        ("no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
    ],
)
def test_bad_reward_specs_are_user_errors(spec, message):
    with pytest.raises(RecipeError) as info:
        load_reward(spec, RewardsSignal())
    assert message in str(info.value).lower() or message in str(info.value)
    assert "signal.reward" in str(info.value)
    assert info.value.hint  # says how to fix it


def test_missing_function_suggests_a_close_name(tmp_path):
    name = write_module(tmp_path, "def score(response, example):\n    return 1.0\n")
    with pytest.raises(RecipeError, match=rf"has no 'scor'; did you mean '{name}:score'"):
        load_reward(f"{name}:scor", RewardsSignal(), search_dirs=[tmp_path])


@pytest.mark.parametrize(
    "source, message",
    [
        ("def score(response):\n    return 1.0\n", "cannot be called as score(response, example)"),
        ("def score(a, b, c):\n    return 1.0\n", "cannot be called as score(response, example)"),
        ("def score(a, b, *, key):\n    return 1.0\n", "cannot be called as score(response, example)"),
        ("score = 3\n", "is a int, not a function"),
        ("import not_installed_dependency_xyz\n", "needs module 'not_installed_dependency_xyz'"),
        ("raise RuntimeError('boom at import')\n", "raised RuntimeError: boom at import"),
    ],
)
def test_user_reward_problems_are_explained(tmp_path, source, message):
    name = write_module(tmp_path, source)
    with pytest.raises(UserError) as info:
        load_reward(f"{name}:score", RewardsSignal(), search_dirs=[tmp_path])
    assert message in str(info.value)


# --- calling safely -------------------------------------------------------------------------


def test_call_reward_contains_exceptions_with_the_example_id():
    def broken(response, example):
        raise KeyError("answer")

    reward, error = call_reward(broken, "x", {}, "data.jsonl:7")
    assert reward is None
    assert error.startswith("data.jsonl:7: ") and "KeyError" in error and "broken" in error


def test_call_reward_contains_sys_exit():
    def quits(response, example):
        sys.exit(3)

    reward, error = call_reward(quits, "x", {}, "ex-1")
    assert reward is None and "SystemExit" in error


@pytest.mark.parametrize("value", ["1.0", None, (1.0,), float("nan"), math.inf])
def test_call_reward_rejects_non_numbers(value):
    reward, error = call_reward(lambda r, e: value, "x", {}, "ex-2")
    assert reward is None
    assert error.startswith("ex-2: ")


def test_call_reward_accepts_numbers_of_any_kind():
    class Scalar:  # e.g. a numpy or torch scalar
        def __float__(self):
            return 0.25

    for value, expected in [(1, 1.0), (True, 1.0), (0.5, 0.5), (Scalar(), 0.25), (7, 7.0)]:
        assert call_reward(lambda r, e, v=value: v, "x", {}, "id") == (expected, None)
