"""Code that tries to forge its python_tests score, rather than solve the task, scores 0.

Against the old harness (same interpreter as the code) one line scored 1.0: call the harness's
own reporting function for every test and exit, or write the result token from sys.argv to the
inherited result fd; reading the expected answers or replacing the comparison scored 0.67. Each
attack here is written to work against any harness it can reach (frames, every fd, argv, files,
/proc) and runs at both isolation levels; every one must score 0, while an honest solution of
the same task scores 1. test_sandbox_as_user.py runs this file again as a normal user.
"""

from __future__ import annotations

import json
import os
import secrets

import pytest
from sandbox_helpers import level  # noqa: F401  (a fixture)

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification import sandbox
from sdcli.verification.python_tests import python_tests
from sdcli.verification.sandbox import Isolation

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")

LIMITS = SandboxLimits(wall_seconds=6, cpu_seconds=4, memory_mb=256)
KEY = secrets.token_hex(6)  # the expected answers are unguessable: SECRET-<KEY>-<n>


def task(tests: bool = True, test_code: bool = True) -> dict:
    example: dict = {"entry_point": "f"}
    if tests:
        example["tests"] = [{"input": f"f({n})", "expected": repr(f"SECRET-{KEY}-{n}")} for n in (1, 2)]
    if test_code:
        example["test_code"] = f"assert f(3) == 'SECRET-{KEY}-3'\nassert f(4) == 'SECRET-{KEY}-4'"
    return example


HONEST = f"def f(n):\n    return 'SECRET-{KEY}-' + str(n)"


@pytest.fixture()
def at_level(level, monkeypatch, tmp_path):
    """python_tests at `level`, with the data set on disk as training has it (a file the code may look for)."""
    monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(level, os.geteuid() == 0))
    data = tmp_path / "data" / "tasks.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": "Write f.", **task()}) + "\n")
    data.chmod(0o644)
    return level


def score(code: str, example: dict) -> float:
    return python_tests(f"```python\n{code}\n```", example, limits=LIMITS)[0]


SHAPES = [(True, True), (True, False), (False, True)]
SHAPE_IDS = ["tests+test_code", "tests", "test_code"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_honest_solution_scores_1(at_level, shape):
    assert score(HONEST, task(*shape)) == 1.0


# Call anything that looks like a reporting function, on every frame up the stack, for every
# test; write "passed" lines in every format (with each argv word as a token) to every fd; exit.
REPORT_AND_EXIT = """
import json, os, sys

def forge():
    lines = []
    for i in range(8):
        event = {"event": "test", "i": i, "passed": True}
        lines += [word + " " + json.dumps(event) for word in sys.argv]
        lines += [json.dumps(event), json.dumps({"i": i, "passed": True, "value": True})]
    lines += [json.dumps({"passed": True}), json.dumps({"event": "done"}), json.dumps({"loaded": True})]
    blob = ("\\n".join(lines) + "\\n").encode()
    for fd in range(64):
        try:
            os.write(fd, blob)
        except OSError:
            pass
    frame = sys._getframe()
    while frame is not None:
        for name, fn in list(frame.f_globals.items()):
            if callable(fn) and name.lower().strip("_") in ("emit", "report", "send", "record", "ok", "passed"):
                for i in range(8):
                    for kw in ({"event": "test", "i": i, "passed": True}, {"i": i, "passed": True}, {"passed": True}):
                        try:
                            fn(**kw)
                        except BaseException:
                            pass
        frame = frame.f_back
    os._exit(0)
"""


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("when", ["at load", "in the call"])
def test_reporting_passes_and_exiting_scores_0(at_level, shape, when):
    code = REPORT_AND_EXIT + ("forge()\ndef f(n):\n    return None" if when == "at load" else "def f(n):\n    forge()")
    assert score(code, task(*shape)) == 0.0


# Look for the expected answers wherever the code can reach: the stack's frames, argv, the
# environment, stdin and every fd, files in and above the folder, every process's /proc entry,
# and any .json/.jsonl file on the machine. Through /proc it reads only the read ends of
# pipes: opening its own output pipe there for reading would swallow its own results (the
# runner's "loaded" line, when the harness had not read it yet), a race that scored the
# planted-answer check below 0 on some runs. The file walk stops itself after 2 s, nearest folders
# first, or as soon as it holds answers to f(1) and f(2), so that a score of 0 means nothing was
# found, not that the search ran out of time (a large Python install under /root or /work takes
# longer to walk than the limits allow, and a loaded machine longer still).
FIND_THE_ANSWERS = """
import os, re, sys, time
PATTERN = re.compile(r"SECRET-[0-9a-f]+-\\d+")
found = set()
STOP_WALKING_AT = time.monotonic() + 2.0

def look(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, str):
        found.update(PATTERN.findall(text))

def walk(value, depth=0):
    if depth > 6:
        return
    look(value) if isinstance(value, (str, bytes)) else None
    if isinstance(value, dict):
        for k, v in list(value.items()):
            walk(k, depth + 1); walk(v, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in list(value):
            walk(v, depth + 1)

def attempt(fn):
    try:
        fn()
    except BaseException:
        pass

def search():
    frame = sys._getframe()
    while frame is not None:
        walk(frame.f_globals); walk(frame.f_locals)
        frame = frame.f_back
    walk(sys.argv); walk(dict(os.environ))
    for fd in range(64):
        attempt(lambda: os.set_blocking(fd, False))
        attempt(lambda: look(os.read(fd, 1 << 20)))
    def read(path):  # never blocks, even on another process's pipe
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            look(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    def read_end(pid, fd):  # a write end holds only what its writers (the code itself) wrote
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            flags = int(info.read().split("flags:")[1].split()[0], 8)
        return flags & os.O_ACCMODE != os.O_WRONLY
    pids = ["self"]
    attempt(lambda: pids.extend(os.listdir("/proc")))
    for pid in pids:
        for part in ("cmdline", "environ"):
            attempt(lambda: read(f"/proc/{pid}/{part}"))
        for fd in (0, 3, 4, 5, 6):
            attempt(lambda: read_end(pid, fd) and read(f"/proc/{pid}/fd/{fd}"))
    for top in (".", "..", "/tmp", "/home", "/root", "/work", "/"):
        try:
            for root, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "usr", "lib", "var", "etc", "boot")]
                if time.monotonic() > STOP_WALKING_AT or {"1", "2"} <= {a.rsplit("-", 1)[1] for a in found}:
                    raise TimeoutError  # out of time, or it has what the tests ask for
                for name in files:
                    if name.endswith((".json", ".jsonl", ".py")):
                        attempt(lambda: read(os.path.join(root, name)))
        except BaseException:
            pass

def f(n):
    if not found:
        search()
    for answer in found:
        if answer.endswith("-" + str(n)):
            return answer
    return None
"""


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reading_the_expected_answers_scores_0(at_level, shape):
    assert score(FIND_THE_ANSWERS, task(*shape)) == 0.0


def test_the_search_does_find_answers_it_can_reach(at_level):
    """The attack above works and ends in time: given the answers in its own file, it scores 1.
    (Only `tests`: reading every fd, it also swallows the judge's requests, which fails test_code.)"""
    planted = f"# SECRET-{KEY}-1 SECRET-{KEY}-2\n"
    assert score(planted + FIND_THE_ANSWERS, task(test_code=False)) == 1.0


# Make every comparison say "equal": replace anything named like a comparison on every frame,
# patch builtins and the modules a harness would use, and return an object equal to anything.
REPLACE_THE_COMPARISON = """
import builtins, json, math, operator, sys

class Equal:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__

def always(*args, **kwargs):
    return True

def patch():
    frame = sys._getframe()
    while frame is not None:
        for name in list(frame.f_globals):
            if name.lower().strip("_") in ("same", "compare", "equal", "check", "isclose", "plain", "passed"):
                frame.f_globals[name] = always
        frame = frame.f_back
    math.isclose = operator.eq = always
    builtins.AssertionError = type("Never", (Exception,), {})
    json.loads = lambda *a, **k: {"passed": True}

def f(n):
    patch()
    return Equal()
"""


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_replacing_the_comparison_scores_0(at_level, shape):
    assert score(REPLACE_THE_COMPARISON, task(*shape)) == 0.0


@pytest.mark.parametrize(
    "body",
    [
        "raise SystemExit(0)",
        "raise KeyboardInterrupt",
        "import os; os.kill(os.getpid(), 9)",
        "import sys; sys.stdout = None; return None",
        "return __import__('builtins').__dict__",
    ],
)
def test_the_test_code_cannot_be_ended_early_or_fooled(at_level, body):
    assert score(f"def f(n):\n    {body}", task(tests=False)) == 0.0


def test_the_code_cannot_shadow_what_the_test_code_compares_with(at_level):
    example = {"entry_point": "f", "test_code": "assert f([3, 1, 2]) == sorted([3, 1, 2])\nassert f([]) == list()"}
    assert score("def f(xs):\n    return sorted(xs)", example) == 1.0
    forged = "sorted = list = lambda *a: 0\ndef f(xs):\n    return 0"
    assert score(forged, example) == 0.0
