"""Environments: run a response and say how it went, as (reward, feedback text).

Built-in `python_tests` runs the code in a response against the example's tests, in the sandbox.
A data line for it:

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

All tests run in ONE sandboxed process (one interpreter start per response). The harness reports
each test on its own line, marked with a random token, through a copy of stdout taken before the
code runs; what the code prints is discarded, so it cannot pass for a result (the report itself
counts toward `output_bytes`: at most about 1 KB per test). Loading the code and each test have
their own time budget, wall_seconds / (tests + 2); after a test times out the rest are not run
(they count as failed): an endless loop usually repeats, and each sample's time is training time.

A user environment is `package.module:function(response, example) -> (reward, feedback)`,
loaded and checked like a user reward (see rewards.py). It runs in the training process: it is
your code; to run the model's code, call `sdcli.sandbox.run_python` from it. `call_environment`
contains its errors the same way `call_reward` does.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdcli.config import SandboxLimits
from sdcli.rewards import as_reward, callable_name, check_callable, show_value
from sdcli.sandbox import SandboxResult, run_python

EnvFn = Callable[[str, dict], tuple]

BUILTIN_ENVIRONMENTS = ("python_tests",)

NO_CODE = "No Python code was found in the response. Write the complete solution in a ```python code block."

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3", "py3")
_CODE_START = re.compile(r"^(def |class |import |from \w[\w.]* import |@)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Loading and calling


def load_environment(spec: str, cfg, search_dirs: Sequence[Path] = ()) -> EnvFn:
    """`python_tests` or `package.module:function` -> a callable (response, example) -> (reward, feedback)."""
    if spec == "python_tests":
        return functools.partial(python_tests, limits=cfg.sandbox, max_feedback_chars=cfg.max_feedback_chars)
    return check_callable(
        spec,
        "signal.environment",
        "(response: str, example: dict) -> (reward: float, feedback: str)",
        BUILTIN_ENVIRONMENTS,
        search_dirs,
    )


def call_environment(
    fn: Callable, response: str, example: dict, example_id: str, max_feedback_chars: int
) -> tuple[float | None, str | None, str | None]:
    """(reward, feedback, None), or (None, None, message) when the function raised or returned junk."""
    name = callable_name(fn)
    try:
        value = fn(response, example)
    except (Exception, SystemExit) as e:  # SystemExit too: a stray sys.exit() must not end training
        return None, None, f"{example_id}: environment {name} raised {type(e).__name__}: {e}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return None, None, f"{example_id}: environment {name} returned {show_value(value)}; expected (reward, feedback)"
    reward, error = as_reward(value[0], fn, example_id)
    if error is not None:
        return None, None, error
    feedback = value[1]
    if feedback is not None and not isinstance(feedback, str):
        return (
            None,
            None,
            f"{example_id}: environment {name} returned feedback {show_value(feedback)}; expected a string or None",
        )
    return reward, cap(feedback or "", max_feedback_chars), None


def cap(text: str, limit: int) -> str:
    marker = "\n[... feedback truncated ...]"
    return text if len(text) <= limit else text[: max(limit - len(marker), 0)] + marker


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


# ---------------------------------------------------------------------------------------------
# The environment


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
    spec = {"tests": tests, "test_code": example.get("test_code"), "entry_point": example.get("entry_point")}
    total = len(tests) + (1 if spec["test_code"] else 0)
    if total == 0:
        raise ValueError("the example has no 'tests' and no 'test_code'")  # load() rejects such lines
    per_test = limits.wall_seconds / (total + 2)
    token = secrets.token_hex(8)
    result = run_python(
        _HARNESS, limits, files={"solution.py": code, "tests.json": json.dumps(spec)}, args=[token, f"{per_test:.3f}"]
    )
    events = _events(result.stdout, token)
    reward, feedback = _summarize(events, result, spec, total, per_test, limits)
    return reward, cap(feedback, max_feedback_chars)


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


def _events(stdout: str, token: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        if line.startswith(token + " "):
            try:
                events.append(json.loads(line[len(token) + 1 :]))
            except ValueError:
                pass
    return events


def _summarize(
    events: list[dict], result: SandboxResult, spec: dict, total: int, per_test: float, limits: SandboxLimits
) -> tuple[float, str]:
    load_error = next((e for e in events if e["event"] == "load_error"), None)
    if load_error is not None:
        return 0.0, load_error["error"]
    results = {e["i"]: e for e in events if e["event"] == "test"}
    if not results and not any(e["event"] == "loaded" for e in events):
        return 0.0, "The code did not run: " + _why_stopped(result, limits)
    passed = sum(1 for r in results.values() if r["passed"])
    if passed == total:
        return 1.0, ""
    failures, skipped = [], 0
    for i in range(total):
        r = results.get(i)
        if r is not None and r["passed"]:
            continue
        if r is not None and r.get("skipped"):
            skipped += 1
            continue
        is_code = i == len(spec["tests"])
        label = "The test code" if is_code else f"Test: {spec['tests'][i]['input']}"
        if r is None:
            failures.append(f"{label}\nDid not finish: {_why_stopped(result, limits)}")
            break  # the process stopped here; the tests after it never ran
        if r.get("timeout"):
            failures.append(f"{label}\nTimed out after {per_test:.1f}s (an endless loop, or far too slow?)")
        elif r.get("error"):
            failures.append(f"{label}\n{'Failed:' if is_code else 'Raised:'}\n{r['error']}")
        else:
            failures.append(f"{label}\nExpected: {spec['tests'][i]['expected']}\nGot: {r['got']}")
    shown = failures[:2]
    more = len(failures) - len(shown)
    text = f"{passed} of {total} tests passed.\n\n" + "\n\n".join(shown)
    if more > 0:
        text += f"\n\n({more} more failing test{'s' if more > 1 else ''} not shown.)"
    if skipped:
        text += f"\n\n({skipped} test{'s were' if skipped > 1 else ' was'} not run after the timeout.)"
    return passed / total, text


def _why_stopped(result: SandboxResult, limits: SandboxLimits) -> str:
    reason = result.killed_reason
    if reason == "wall_time":
        return f"it timed out (the run is limited to {limits.wall_seconds:g}s); an endless loop?"
    if reason == "cpu_time":
        return f"it used more than {limits.cpu_seconds}s of CPU time; an endless loop?"
    if reason == "memory":
        return f"it ran out of memory (the limit is {limits.memory_mb} MB)."
    if reason == "output_limit":
        return f"it printed more than {limits.output_bytes} bytes."
    if reason and reason.startswith("signal:"):
        return f"it crashed ({reason[7:]}), for example from very deep recursion."
    tail = "\n".join(result.stderr.strip().splitlines()[-6:])
    return f"it stopped unexpectedly (exit code {result.returncode}).\n{tail}".strip()


# ---------------------------------------------------------------------------------------------
# The harness, run as main.py in the sandbox: python main.py TOKEN PER_TEST_SECONDS, next to
# solution.py and tests.json. One JSON event per line on a private copy of stdout.

_HARNESS = r'''
import ast, json, linecache, math, os, reprlib, signal, sys, traceback

TOKEN, PER_TEST = sys.argv[1], float(sys.argv[2])
OUT = os.dup(1)
_null = os.open("/dev/null", os.O_WRONLY)
os.dup2(_null, 1)  # what the code writes to fd 1 goes nowhere; results go to OUT

def emit(**event):
    os.write(OUT, (TOKEN + " " + json.dumps(event) + "\n").encode())

class _Sink:
    def write(self, s): return len(s)
    def flush(self): pass
    def isatty(self): return False

with open("tests.json", encoding="utf-8") as f:
    SPEC = json.load(f)
os.remove("tests.json")  # the code under test does not get to read the answers
EXPECTED = [ast.literal_eval(t["expected"]) for t in SPEC["tests"]]
USER_FILES = {"solution.py", "<test>", "<test_code>"}

class Timeout(BaseException):  # BaseException: `except Exception` in the code does not swallow it
    pass

def _alarm(signum, frame):
    raise Timeout()

signal.signal(signal.SIGALRM, _alarm)

def register(name, text):
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)

def describe(e):
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in USER_FILES]
    head = ["Traceback (most recent call last):\n", *traceback.format_list(frames[-4:])] if frames else []
    text = "".join(head + traceback.format_exception_only(type(e), e)).rstrip()
    if isinstance(e, EOFError):
        text += "\n(The code called input(); the tests call the function directly instead.)"
    return text[-1000:]  # the report counts toward output_bytes: at most ~1 KB per test

def run(fn):
    """(value, error text, timed out)"""
    sys.stdout = sys.stderr = _Sink()
    signal.setitimer(signal.ITIMER_REAL, PER_TEST)
    try:
        return fn(), None, False
    except Timeout:
        return None, None, True
    except SystemExit as e:
        return None, f"The code called sys.exit({e.code!r}).", False
    except BaseException as e:
        return None, describe(e), False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__

SHORT = reprlib.Repr()
SHORT.maxstring, SHORT.maxother, SHORT.maxlist, SHORT.maxtuple, SHORT.maxdict, SHORT.maxset = 200, 200, 20, 20, 20, 20
PLAIN = (int, float, complex, str, bytes, bool, type(None))

def plain(x, depth=0):
    if depth > 50:
        return False
    t = type(x)
    if t in PLAIN:
        return True
    if t in (list, tuple, set, frozenset):
        return all(plain(v, depth + 1) for v in x)
    if t is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
    return False

def same(got, exp):
    if isinstance(got, float) or isinstance(exp, float):
        if type(got) in (int, float) and type(exp) in (int, float):
            return math.isclose(got, exp, rel_tol=1e-9, abs_tol=1e-9)
    if type(got) in (list, tuple) and type(got) is type(exp):
        return len(got) == len(exp) and all(same(a, b) for a, b in zip(got, exp))
    if type(got) is dict and type(exp) is dict:
        return got.keys() == exp.keys() and all(same(got[k], exp[k]) for k in got)
    return got == exp

with open("solution.py", encoding="utf-8") as f:
    SOURCE = f.read()
register("solution.py", SOURCE)
NS = {"__name__": "solution", "__builtins__": __builtins__}  # not __main__: a main block does not run

def load():
    exec(compile(SOURCE, "solution.py", "exec"), NS)

_, error, timed_out = run(load)
if timed_out:
    error = f"Loading the code timed out after {PER_TEST:.1f}s (an endless loop or input() at the top level?)"
elif error is not None:
    error = "The code failed before any test could run:\n" + error
entry = SPEC.get("entry_point")
if error is None and entry and not callable(NS.get(entry)):
    error = f"The code does not define a function named `{entry}`, which the tests call."
if error is not None:
    emit(event="load_error", error=error)
    sys.exit(0)
emit(event="loaded")

stopped = False  # after a timeout the rest is not run: an endless loop usually repeats, and time is short
for i, test in enumerate(SPEC["tests"]):
    if stopped:
        emit(event="test", i=i, passed=False, skipped=True)
        continue
    register("<test>", test["input"])
    code = compile(test["input"], "<test>", "eval")
    got, error, timed_out = run(lambda: eval(code, NS))
    stopped = timed_out
    if timed_out or error is not None:
        emit(event="test", i=i, passed=False, timeout=timed_out, error=error)
        continue
    is_plain = plain(got)
    ok = is_plain and run(lambda: bool(same(got, EXPECTED[i])))[0]
    shown = SHORT.repr(got) if is_plain else f"an object of type {type(got).__name__}"
    emit(event="test", i=i, passed=bool(ok), got=shown)

if SPEC.get("test_code") and stopped:
    emit(event="test", i=len(SPEC["tests"]), passed=False, skipped=True)
elif SPEC.get("test_code"):
    register("<test_code>", SPEC["test_code"])
    code = compile(SPEC["test_code"], "<test_code>", "exec")
    _, error, timed_out = run(lambda: exec(code, NS))
    emit(event="test", i=len(SPEC["tests"]), passed=error is None and not timed_out, timeout=timed_out, error=error)
emit(event="done")
'''
