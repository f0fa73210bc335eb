"""Environments: run a response and say how it went, as (reward, feedback text).

The built-in one, `python_tests`, runs the code in a response against the example's tests in
the sandbox; python_tests.py describes its data and how its score is kept honest.

A user environment is `package.module:function(response, example) -> (reward, feedback)`,
loaded and checked like a user reward (see scorers.py). It runs in the training process: it is
your code; to run the model's code, call `sdcli.verification.sandbox.run_python` from it.
`call_environment` contains its errors the same way `call_reward` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from sdcli.verification.python_tests import python_tests
from sdcli.verification.python_tests_feedback import cap
from sdcli.verification.scorers import as_reward, callable_name, check_callable, show_value

EnvFn = Callable[[str, dict], tuple]

BUILTIN_ENVIRONMENTS = ("python_tests",)


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
