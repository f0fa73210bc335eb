"""The built-in environment `python_tests` runs the code in a response against the example's tests,
in the sandbox. A data line for it:

    {"prompt": "Write add(a, b) ...", "entry_point": "add",
     "tests": [{"input": "add(1, 2)", "expected": "3"}, {"input": "add('a', 'b')", "expected": "'ab'"}],
     "test_code": "assert add(-1, 1) == 0\\nassert add(0, 0) == 0"}

- `tests`: each `input` is a Python expression, evaluated after the code has run. `expected` is
  a Python literal written as a string ("3", "'ab'", "[1, 2]", "None", "(1, 'x')", "{'a': 1}");
  a non-string JSON value (3, true, null, [1, 2], {"a": 1}) is taken as it is. The test passes
  when the value equals the expected one: Python `==`, floats within 1e-9 (relative or absolute),
  and the value must be built from plain types (numbers, str, bytes, None, list, tuple, dict,
  set), so an object that claims to equal everything does not pass.
- `test_code`: Python statements (usually asserts) run after the code, together counting as ONE
  test; it passes when it raises nothing.
- A line needs `tests`, `test_code` or both. `entry_point` (optional) names the function the
  tests call: the code block that defines it is preferred, and its absence is reported plainly.

reward = passed / total tests. Feedback is "" when every test passed; otherwise the first error
that stopped the code (a SyntaxError or NameError, with the tail of its traceback), or up to two
failing tests with input / expected / got, or that the code timed out, ran out of memory or
printed too much; at most `max_feedback_chars` long.

Where the code comes from: the last ```python block in the response (if `entry_point` is given,
the last one that defines it), else the last ``` block of any kind (an unclosed final block
counts: generation may stop early), else the response itself if it parses as Python, else the
part of it from the first `def`/`class`/`import` line that does.

How the score is kept honest: the code runs in a sandbox of its own (the "runner"), which is
given each test's input expression, never its expected value, and prints only the values it
got; this process compares them (so nothing the code prints, and no harness function it could
call or replace, can claim a pass). `test_code` runs in a second sandbox (the "judge") where the
code's names are proxies that ask the runner: its asserts are decided there, out of the code's
reach, on plain values (see python_tests_child.py). Loading the code and each test have their
own time budget, wall_seconds / (tests + 2); after a test times out the rest are not run (they
count as failed): an endless loop usually repeats, and each sample's time is training time. A
result larger than its share of output_bytes (output_bytes / (tests + 3)) counts as failed. A
runner that exits early or prints garbage scores 0 for the tests it did not answer. What the
two print is read, compared and summed up in python_tests_feedback.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification import python_tests_child
from sdcli.verification.python_tests_feedback import cap, judge_event, runner_events, summarize
from sdcli.verification.sandbox import isolation, run_python
from sdcli.verification.sandbox_result import SandboxResult

NO_CODE = "No Python code was found in the response. Write the complete solution in a ```python code block."

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "py3")
_CODE_START = re.compile(r"^(def |class |import |from \w[\w.]* import |@)", re.MULTILINE)
# The runner and judge programs, run as main.py in their sandboxes (see python_tests_child.py).
_CHILD = Path(python_tests_child.__file__).read_text(encoding="utf-8")


def python_tests(
    response: str, example: dict, *, limits: SandboxLimits | None = None, max_feedback_chars: int = 1500
) -> tuple[float, str]:
    """Run the response's code against the example's tests; (fraction passed, feedback or "")."""
    limits = limits or SandboxLimits()
    code = extract_code(response, example.get("entry_point"))
    if code is None:
        return 0.0, NO_CODE
    # `expected` travels as literal source; a JSON value becomes its Python repr.
    tests = [
        {"input": t["input"].strip(), "expected": _literal_source(t["expected"])} for t in example.get("tests") or []
    ]
    test_code = example.get("test_code")
    total = len(tests) + (1 if test_code else 0)
    if total == 0:
        raise ValueError("the example has no 'tests' and no 'test_code'")  # load() rejects such lines
    per_test = limits.wall_seconds / (total + 2)
    ran, judged = _run(code, tests, test_code, example.get("entry_point"), per_test, limits)
    reward, feedback = summarize(runner_events(ran.stdout), judge_event(judged), ran, tests, total, per_test, limits)
    return reward, cap(feedback, max_feedback_chars)


def _run(
    code: str, tests: list[dict], test_code: str | None, entry_point: str | None, per_test: float, limits: SandboxLimits
) -> tuple[SandboxResult, SandboxResult | None]:
    """The runner's result, and the judge's when there is test_code (the two run side by side)."""
    config = {
        "entry_point": entry_point,
        "per_test": per_test,
        "value_bytes": max(limits.output_bytes // (len(tests) + 3), 256),
        "rpc": None,
    }
    files = {"solution.py": code, "inputs.json": json.dumps([t["input"] for t in tests])}
    preload = python_tests_child.PRELOAD
    if not test_code:
        return run_python(_CHILD, limits, files=files, args=["runner", json.dumps(config)], preload=preload), None
    isolation()  # decided once, before two threads would both ask
    to_runner_r, to_runner_w = os.pipe()
    to_judge_r, to_judge_w = os.pipe()
    config["rpc"] = [to_runner_r, to_judge_w]
    judge_config = {"per_test": per_test, "rpc": [to_judge_r, to_runner_w]}
    with ThreadPoolExecutor(max_workers=1) as pool:
        judged = pool.submit(
            run_python,
            _CHILD,
            limits,
            args=["judge", json.dumps(judge_config)],
            stdin=test_code.encode("utf-8"),
            pass_fds=(to_judge_r, to_runner_w),
            preload=preload,
        )
        ran = run_python(
            _CHILD,
            limits,
            files=files,
            args=["runner", json.dumps(config)],
            pass_fds=(to_runner_r, to_judge_w),
            preload=preload,
        )
        return ran, judged.result()


def _literal_source(expected: Any) -> str:
    return expected.strip() if isinstance(expected, str) else repr(expected)


def extract_code(response: str, entry_point: str | None = None) -> str | None:
    """The code to run from a response, or None (see the module docstring for the order)."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if entry_point:
        defining = [
            body
            for body in python or [b for _, b in blocks]
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", body)
        ]
        if defining:
            return defining[-1]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    if _is_code(response):
        return response
    start = _CODE_START.search(response)
    if start is None:
        return None
    lines = response[start.start() :].splitlines()
    for end in range(len(lines), 0, -1):  # drop trailing prose until what is left parses
        candidate = "\n".join(lines[:end])
        if _is_code(candidate):
            return candidate
    return None


def _is_code(text: str) -> bool:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return any(not isinstance(node, ast.Expr) for node in tree.body)


# ---------------------------------------------------------------------------------------------
# Data checks


def check_python_tests(example: dict) -> list[str]:
    """Every problem with a data line's tests for `python_tests` (empty when it is fine)."""
    problems = []
    tests, test_code = example.get("tests"), example.get("test_code")
    if tests is None and test_code is None:
        return [
            "needs 'tests' (a list of {\"input\": ..., \"expected\": ...}) or 'test_code' (Python statements), or both"
        ]
    if tests is not None:
        if not isinstance(tests, list) or not tests:
            problems.append(f"'tests' must be a non-empty list of objects, got {_type(tests)}")
        else:
            for i, test in enumerate(tests):
                problems += _check_test(i, test)
    if test_code is not None:
        if not isinstance(test_code, str) or not test_code.strip():
            problems.append(f"'test_code' must be a non-empty string of Python statements, got {_type(test_code)}")
        else:
            try:
                ast.parse(test_code)
            except SyntaxError as e:
                problems.append(f"'test_code' is not valid Python: {e.msg} (its line {e.lineno})")
    entry = example.get("entry_point")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        problems.append(f"'entry_point' must be a function name, got {entry!r}")
    return problems


def _check_test(i: int, test: Any) -> list[str]:
    where = f"'tests[{i}]'"
    if not isinstance(test, dict) or "input" not in test or "expected" not in test:
        found = f"keys {sorted(test)}" if isinstance(test, dict) else _type(test)
        return [f"{where} must be an object with 'input' and 'expected', got {found}"]
    problems = []
    if not isinstance(test["input"], str) or not test["input"].strip():
        problems.append(f'{where}.input must be a Python expression as a string, e.g. "add(1, 2)"')
    else:
        try:
            ast.parse(test["input"].strip(), mode="eval")
        except SyntaxError as e:
            problems.append(f"{where}.input {test['input']!r} is not a Python expression ({e.msg})")
    expected = test["expected"]
    if isinstance(expected, str):
        try:
            ast.literal_eval(expected.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            problems.append(
                f"{where}.expected {expected!r} is not a Python literal; "
                f"a string answer needs quotes inside the JSON string, e.g. \"'{expected}'\""
            )
    return problems


def _type(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"
