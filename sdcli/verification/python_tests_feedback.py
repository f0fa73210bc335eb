"""What python_tests makes of a run: the runner's and the judge's output read strictly, a verdict
per test (the comparison with the expected values happens here, out of the code's reach), and
the reward with its feedback text. `cap` cuts any environment's feedback to its length limit."""

from __future__ import annotations

import ast
import json
import math
import reprlib
from typing import Any

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.python_tests_child import decode
from sdcli.verification.sandbox_result import SandboxResult

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 200
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 20


def runner_events(stdout: str) -> dict:
    """What the runner printed, read strictly: {"loaded": bool, "load_error": str | None, "results": {i: event}}.

    Only the first well-formed line for each test counts; anything else is ignored.
    """
    seen: dict = {"loaded": False, "load_error": None, "results": {}}
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(event, dict):
            continue
        if event.get("loaded") is True:
            seen["loaded"] = True
        elif isinstance(event.get("load_error"), str) and not seen["loaded"]:
            seen["load_error"] = event["load_error"]
        elif type(event.get("i")) is int and event["i"] not in seen["results"]:
            seen["results"][event["i"]] = event
    return seen


def judge_event(judged: SandboxResult | None) -> dict | None:
    if judged is None:
        return None
    for line in judged.stdout.splitlines():
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and "passed" in event:
            return event
    return {"passed": False, "crashed": judged}  # it printed no verdict


def summarize(
    runner: dict,
    judge: dict | None,
    result: SandboxResult,
    tests: list[dict],
    total: int,
    per_test: float,
    limits: SandboxLimits,
) -> tuple[float, str]:
    if runner["load_error"] is not None:
        return 0.0, runner["load_error"][:4000]
    if not runner["loaded"]:
        return 0.0, "The code did not run: " + _why_stopped(result, limits)
    verdicts = [_verdict(runner["results"].get(i), t["expected"]) for i, t in enumerate(tests)]
    if judge is not None:
        verdicts.append(_judge_verdict(judge))
    passed = sum(1 for v in verdicts if v == "passed")
    if passed == total:
        return 1.0, ""
    failures, skipped = [], 0
    for i, verdict in enumerate(verdicts):
        if verdict == "passed":
            continue
        if verdict == "skipped":
            skipped += 1
            continue
        label = "The test code" if i == len(tests) else f"Test: {tests[i]['input']}"
        if verdict == "missing":
            failures.append(f"{label}\nDid not finish: {_why_stopped(result, limits)}")
            break  # the process stopped here; the tests after it never ran
        if verdict == "timeout":
            failures.append(f"{label}\nTimed out after {per_test:.1f}s (an endless loop, or far too slow?)")
        else:
            failures.append(f"{label}\n{verdict}")
    shown = failures[:2]
    more = len(failures) - len(shown)
    text = f"{passed} of {total} tests passed.\n\n" + "\n\n".join(shown)
    if more > 0:
        text += f"\n\n({more} more failing test{'s' if more > 1 else ''} not shown.)"
    if skipped:
        text += f"\n\n({skipped} test{'s were' if skipped > 1 else ' was'} not run after the timeout.)"
    return passed / total, text


def _verdict(event: dict | None, expected_source: str) -> str:
    """"passed", "skipped", "missing", "timeout", or the failure text (Raised / Expected and Got)."""
    if event is None:
        return "missing"
    if event.get("skipped") is True:
        return "skipped"
    if event.get("timeout") is True:
        return "timeout"
    if isinstance(event.get("error"), str):
        return f"Raised:\n{event['error'][:1000]}"
    if isinstance(event.get("object"), str):
        return f"Expected: {expected_source}\nGot: an object of type {event['object'][:100]}"
    if type(event.get("too_large")) is int:
        preview = str(event.get("preview", ""))[:300]
        size = event["too_large"]
        return f"Expected: {expected_source}\nGot: a result too large to compare ({size} bytes): {preview}"
    if "value" not in event:
        return "missing"
    try:
        got = decode(event["value"])
    except (ValueError, RecursionError):
        return "missing"
    expected = ast.literal_eval(expected_source)
    if _same(got, expected):
        return "passed"
    return f"Expected: {expected_source}\nGot: {_SHORT.repr(got)}"


def _judge_verdict(event: dict) -> str:
    """Like _verdict, for the judge's one line about test_code."""
    if event.get("passed") is True:
        return "passed"
    if event.get("skipped") is True:
        return "skipped"
    if event.get("timeout") is True:
        return "timeout"
    if event.get("unreachable") is True:
        return "missing"  # the runner stopped; summarize says why
    if isinstance(event.get("error"), str):
        return f"Failed:\n{event['error'][:1000]}"
    crashed = event.get("crashed")
    tail = "\n".join(crashed.stderr.strip().splitlines()[-4:]) if isinstance(crashed, SandboxResult) else ""
    return f"Failed: the test code could not run.\n{tail}".strip()


def _same(got: Any, expected: Any) -> bool:
    """Python == on plain values, floats within 1e-9 (relative or absolute), container types exact."""
    if isinstance(got, float) or isinstance(expected, float):
        if type(got) in (int, float) and type(expected) in (int, float):
            return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    if type(got) in (list, tuple) and type(got) is type(expected):
        return len(got) == len(expected) and all(_same(a, b) for a, b in zip(got, expected))
    if type(got) is dict and type(expected) is dict:
        return got.keys() == expected.keys() and all(_same(got[k], expected[k]) for k in got)
    try:
        return bool(got == expected)
    except Exception:
        return False


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


def cap(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, ending with a marker when it was cut."""
    marker = "\n[... feedback truncated ...]"
    return text if len(text) <= limit else text[: max(limit - len(marker), 0)] + marker
