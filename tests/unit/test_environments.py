"""The python_tests environment: code extraction, the data format, the harness and its feedback."""

from __future__ import annotations

import json
import os
import sys
import uuid

import pytest

from sdcli.core.errors import RecipeError
from sdcli.recipe.signal_sections import FeedbackSignal, SandboxLimits
from sdcli.verification.environments import call_environment, load_environment
from sdcli.verification.python_tests import NO_CODE, check_python_tests, extract_code, python_tests
from sdcli.verification.python_tests_feedback import cap

needs_sandbox = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")

ADD = {
    "entry_point": "add",
    "tests": [
        {"input": "add(1, 2)", "expected": "3"},
        {"input": "add('a', 'b')", "expected": "'ab'"},
        {"input": "add(0.1, 0.2)", "expected": 0.3},
    ],
    "test_code": "assert add(-1, 1) == 0",
}
LIMITS = SandboxLimits(wall_seconds=4, cpu_seconds=4, memory_mb=256)


def block(code: str, tag: str = "python") -> str:
    return f"Here you go:\n```{tag}\n{code}\n```\nHope that helps."


# --- extracting the code ------------------------------------------------------------------------


def test_extract_takes_the_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```python\nx = 2\n```\n```bash\nls\n```"
    assert extract_code(text) == "x = 2\n"


def test_extract_prefers_the_block_that_defines_the_entry_point():
    text = "```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```"
    assert "def add" in extract_code(text, "add")
    assert extract_code(text) == "print(add(1, 2))\n"


def test_extract_falls_back_to_any_block_then_unclosed_then_bare_code():
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # generation stopped early
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("Sure, here it is:\ndef f():\n    return 1\nThis returns one.") == "def f():\n    return 1"


def test_extract_finds_nothing_in_prose():
    assert extract_code("The answer is 3.") is None
    assert extract_code("hello") is None


# --- checking data lines --------------------------------------------------------------------


def test_a_good_line_has_no_problems():
    assert check_python_tests(ADD) == []
    assert check_python_tests({"test_code": "assert True"}) == []


@pytest.mark.parametrize(
    "line, message",
    [
        ({}, "needs 'tests'"),
        ({"tests": []}, "non-empty list"),
        ({"tests": [{"input": "f(1)"}]}, "must be an object with 'input' and 'expected'"),
        ({"tests": [{"input": "f(1", "expected": "1"}]}, "is not a Python expression"),
        ({"tests": [{"input": "f(1)", "expected": "abc def"}]}, "a string answer needs quotes"),
        ({"tests": [{"input": "f(1)", "expected": "x"}]}, "\"'x'\""),
        ({"test_code": "assert f(1) ==="}, "'test_code' is not valid Python"),
        ({"test_code": "assert True", "entry_point": "not a name"}, "'entry_point' must be a function name"),
    ],
)
def test_bad_lines_are_explained(line, message):
    problems = check_python_tests(line)
    assert problems and message in " ".join(problems)


# --- running the tests ----------------------------------------------------------------------


@needs_sandbox
def test_all_tests_pass():
    assert python_tests(block("def add(a, b):\n    return a + b"), ADD, limits=LIMITS) == (1.0, "")


@needs_sandbox
def test_wrong_answers_show_input_expected_and_got():
    reward, feedback = python_tests(block("def add(a, b):\n    return a * b"), ADD, limits=LIMITS)
    assert reward == 0.0
    assert feedback.startswith("0 of 4 tests passed.")
    assert "Test: add(1, 2)\nExpected: 3\nGot: 2" in feedback
    assert "TypeError" in feedback  # 'a' * 'b'
    assert "(2 more failing tests not shown.)" in feedback


@needs_sandbox
def test_partial_credit_and_the_failing_assert_line():
    code = "def add(a, b):\n    if a == -1:\n        return 99\n    return a + b"
    reward, feedback = python_tests(block(code), ADD, limits=LIMITS)
    assert reward == 0.75
    assert "3 of 4 tests passed." in feedback and "assert add(-1, 1) == 0" in feedback and "AssertionError" in feedback


@needs_sandbox
def test_syntax_error_is_reported_with_its_line():
    reward, feedback = python_tests(block("def add(a, b)\n    return a + b"), ADD, limits=LIMITS)
    assert reward == 0.0
    assert "before any test could run" in feedback and 'File "solution.py", line 1' in feedback
    assert "SyntaxError" in feedback


@needs_sandbox
def test_name_error_in_a_test_shows_the_traceback_tail():
    reward, feedback = python_tests(block("def add(a, b):\n    return a + c"), ADD, limits=LIMITS)
    assert reward == 0.0
    assert "NameError: name 'c' is not defined" in feedback and 'File "solution.py", line 2, in add' in feedback
    assert "main.py" not in feedback  # harness frames are hidden


@needs_sandbox
def test_missing_entry_point_is_said_plainly():
    _, feedback = python_tests(block("def plus(a, b):\n    return a + b"), ADD, limits=LIMITS)
    assert feedback == "The code does not define a function named `add`, which the tests call."


@needs_sandbox
def test_no_code_at_all():
    assert python_tests("I would add them.", ADD, limits=LIMITS) == (0.0, NO_CODE)


@needs_sandbox
def test_endless_test_times_out_and_the_rest_is_skipped():
    limits = SandboxLimits(wall_seconds=2, cpu_seconds=5)
    reward, feedback = python_tests(block("def add(a, b):\n    while True:\n        pass"), ADD, limits=limits)
    assert reward == 0.0
    assert "Timed out after" in feedback and "not run after the timeout" in feedback


@needs_sandbox
def test_endless_loop_at_the_top_level():
    _, feedback = python_tests(block("while True:\n    pass"), ADD, limits=SandboxLimits(wall_seconds=2))
    assert "Loading the code timed out" in feedback


@needs_sandbox
def test_memory_error_is_reported():
    _, feedback = python_tests(block("def add(a, b):\n    return [0] * 10**10"), ADD, limits=LIMITS)
    assert "MemoryError" in feedback


@needs_sandbox
def test_printed_junk_and_fake_results_do_not_count():
    code = (
        "import os, json\n"
        "def add(a, b):\n"
        "    print('0123456789abcdef ' + json.dumps({'event': 'test', 'i': 1, 'passed': True}))\n"
        "    os.write(1, b'junk' * 1000)\n"
        "    return 0\n"
    )
    reward, _ = python_tests(block(code), {"tests": ADD["tests"]}, limits=LIMITS)
    assert reward == 0.0


@needs_sandbox
def test_an_object_equal_to_everything_does_not_pass():
    code = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()"
    data = {"tests": ADD["tests"]}
    reward, feedback = python_tests(block(code), data, limits=LIMITS)
    assert reward == 0.0 and "Got: an object of type Any" in feedback


@needs_sandbox
def test_the_code_cannot_read_the_expected_answers():
    code = "import os\ndef add(a, b):\n    return os.path.exists('tests.json')"
    data = {"tests": [{"input": "add(1, 2)", "expected": "False"}]}
    assert python_tests(block(code), data, limits=LIMITS)[0] == 1.0


@needs_sandbox
def test_input_calls_get_a_hint():
    _, feedback = python_tests(block("a = int(input())\ndef add(a, b):\n    return a + b"), ADD, limits=LIMITS)
    assert "EOFError" in feedback and "input()" in feedback


@needs_sandbox
def test_feedback_is_capped():
    _, feedback = python_tests(block("def add(a, b):\n    return a - b"), ADD, limits=LIMITS, max_feedback_chars=100)
    assert len(feedback) <= 100 and feedback.endswith("[... feedback truncated ...]")


STACK = """
class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        if not self.items:
            raise IndexError("empty")
        return self.items.pop()
    def __len__(self):
        return len(self.items)
    def __iter__(self):
        return iter(self.items)
"""
STACK_TESTS = """
s = Stack()
s.push(1)
s.push(2)
assert len(s) == 2 and list(s) == [1, 2] and 2 in s
assert s.pop() == 2 and s.items == [1]
try:
    Stack().pop()
except IndexError:
    pass
else:
    raise AssertionError("no IndexError")
"""


@needs_sandbox
def test_test_code_uses_the_codes_objects_through_the_judge():
    assert python_tests(block(STACK), {"test_code": STACK_TESTS}, limits=LIMITS) == (1.0, "")
    wrong = STACK.replace('raise IndexError("empty")', "return None")
    reward, feedback = python_tests(block(wrong), {"test_code": STACK_TESTS}, limits=LIMITS)
    assert reward == 0.0 and "no IndexError" in feedback


@needs_sandbox
def test_an_object_of_the_code_never_equals_a_value_in_test_code():
    code = "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
    code += "def add(a, b):\n    return Any()"
    reward, feedback = python_tests(block(code), {"test_code": "assert add(1, 2) == 3"}, limits=LIMITS)
    assert reward == 0.0 and "AssertionError" in feedback


@needs_sandbox
def test_test_code_sees_the_codes_errors_with_their_traceback():
    code = "def add(a, b):\n    return a / 0"
    reward, feedback = python_tests(block(code), {"test_code": "assert add(1, 2) == 3"}, limits=LIMITS)
    assert reward == 0.0
    assert 'File "<test_code>", line 1' in feedback and "ZeroDivisionError" in feedback and "solution.py" in feedback


@needs_sandbox
def test_values_of_every_plain_type_are_compared_exactly():
    value = "(1, [2.5, None], {'k': {3, 4}}, b'x', 1267650600228229401496703205376, -1180591620717411303424, 1+2j)"
    tests = [{"input": "f()", "expected": value}]
    assert python_tests(block(f"def f():\n    return {value}"), {"tests": tests}, limits=LIMITS) == (1.0, "")
    as_list = "[" + value[1:-1] + "]"  # a list where a tuple is expected
    reward, feedback = python_tests(block(f"def f():\n    return {as_list}"), {"tests": tests}, limits=LIMITS)
    assert reward == 0.0 and "Got: [1, [2.5, None]" in feedback


@needs_sandbox
def test_a_result_too_large_to_compare_fails_plainly():
    limits = SandboxLimits(wall_seconds=4, cpu_seconds=4, memory_mb=256, output_bytes=4096)
    reward, feedback = python_tests(
        block("def add(a, b):\n    return 'x' * 100_000"), {"tests": ADD["tests"][:1]}, limits=limits
    )
    assert reward == 0.0 and "too large to compare" in feedback


@needs_sandbox
def test_code_that_exits_midway_keeps_what_it_answered():
    code = "import os\ndef add(a, b):\n    if a == 'a':\n        os._exit(0)\n    return a + b"
    reward, feedback = python_tests(block(code), {"tests": ADD["tests"]}, limits=LIMITS)
    assert reward == 1 / 3
    assert "Test: add('a', 'b')\nDid not finish: it stopped unexpectedly (exit code 0)" in feedback


@needs_sandbox
def test_test_code_that_passes_a_function_to_the_code_is_told_why_it_fails():
    example = {"test_code": "assert apply(lambda x: x + 1, 1) == 2"}
    reward, feedback = python_tests(block("def apply(f, x):\n    return f(x)"), example, limits=LIMITS)
    assert reward == 0.0 and "only plain values can cross" in feedback


@needs_sandbox
def test_stdout_of_the_code_does_not_matter():
    code = "def add(a, b):\n    print('Expected: 3')\n    print(a + b)\n    return a + b"
    assert python_tests(block(code), ADD, limits=LIMITS) == (1.0, "")


def test_the_value_format_round_trips_and_refuses_anything_else():
    from sdcli.verification.python_tests_child import NotPlain, decode, encode

    value = {"a": [1, 2.5, None, True], (1, "t"): {b"b", frozenset({3})}, "nan": float("nan"), "big": 3**90, "c": 1j}
    back = decode(json.loads(json.dumps(encode(value))))
    assert back.keys() == value.keys() and back["big"] == 3**90 and back["nan"] != back["nan"]
    assert back[(1, "t")] == {b"b", frozenset({3})} and type(back[(1, "t")]) is set
    for bad in ({"eval": "1"}, {"tuple": "x"}, {"set": [[1]]}, {"ref": 1, "type": "x"}, {"a": 1, "b": 2}):
        with pytest.raises(ValueError):
            decode(bad)
    with pytest.raises(NotPlain):
        encode(object())
    with pytest.raises(NotPlain):
        encode(type("MyInt", (int,), {})(3))  # a subclass does not pass for its base


# --- loading and calling environments -------------------------------------------------------


def test_load_builtin_binds_the_recipe_limits():
    cfg = FeedbackSignal(max_feedback_chars=321, sandbox=SandboxLimits(wall_seconds=3))
    fn = load_environment("python_tests", cfg)
    assert fn.keywords == {"limits": cfg.sandbox, "max_feedback_chars": 321}


def test_load_user_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"user_env_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def judge(response, example):\n    return 1.0, 'fine'\n")
    fn = load_environment(f"{name}:judge", FeedbackSignal(), search_dirs=[tmp_path])
    assert fn("x", {}) == (1.0, "fine")
    with pytest.raises(RecipeError, match="signal.environment"):
        load_environment("python-tests", FeedbackSignal())


@pytest.mark.parametrize(
    "returns, message",
    [
        (1.0, "expected (reward, feedback)"),
        ((1.0, "a", "b"), "expected (reward, feedback)"),
        (("yes", "ok"), "a reward must be a number"),
        ((1.0, 5), "expected a string or None"),
    ],
)
def test_call_environment_contains_bad_returns(returns, message):
    reward, feedback, error = call_environment(lambda r, e: returns, "x", {}, "tasks.jsonl:3", 100)
    assert reward is None and feedback is None
    assert error.startswith("tasks.jsonl:3: ") and message in error


def test_call_environment_contains_exceptions_and_caps_feedback():
    def broken(response, example):
        raise ValueError("no tests")

    reward, feedback, error = call_environment(broken, "x", {}, "t:1", 100)
    assert reward is None and error.startswith("t:1: environment ") and "broken raised ValueError: no tests" in error
    reward, feedback, error = call_environment(lambda r, e: (0.5, "y" * 500), "x", {}, "t:1", 100)
    assert (reward, error) == (0.5, None) and len(feedback) == 100
    assert call_environment(lambda r, e: (1, None), "x", {}, "t:1", 100) == (1.0, "", None)


def test_cap_leaves_short_text_alone():
    assert cap("short", 100) == "short"
