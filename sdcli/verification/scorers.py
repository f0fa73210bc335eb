"""Reward functions: score one response against its example, as a number.

Built-ins, each `(response, example) -> float` in [0, 1], where `example` is the data line as a
dict (the `answer` key holds the reference):

- `exact_match`: the whole response equals `answer` after normalisation: both are stripped,
  runs of whitespace become one space, trailing periods are dropped, and case is ignored unless
  `case_sensitive`. "  The answer is 42. " matches "the answer is 42"; "42" does not match "The
  answer is 42" (use `numeric` or `contains` for that).
- `numeric`: the LAST number in the response equals `answer` within `tolerance` (absolute).
  Numbers may be negative, decimal, use thousands separators (1,234,567) or be fractions (3/4);
  "The answer is -1,250." reads as -1250. A minus sign glued to a word or digit is a hyphen
  ("3-5" is 3 and 5).
- `regex`: `pattern` (from the recipe) or else the example's `answer`, used as a regular
  expression, is found anywhere in the response (re.search).
- `contains`: the normalised `answer` occurs in the normalised response.

A user reward is `package.module:function`, called as `function(response, example)`, returning a
real number (any scale; `success_threshold` decides what counts as a success). The module is
imported from sys.path, to which the current folder and any `search_dirs` (e.g. the recipe's
folder) are appended. `check_callable` is what `sd validate` runs; `call_reward` is what the training loop
runs: it never raises for the user's code, so a crashing reward masks one sample instead of
ending the run.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import numbers
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from sdcli.core.errors import RecipeError

RewardFn = Callable[[str, dict], float]

BUILTIN_REWARDS = ("exact_match", "numeric", "regex", "contains")

# A number: optional sign, digits with or without thousands separators, optional decimals, or a
# bare decimal like .5; optionally "/ denominator". Signs glued to a word or number are hyphens.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.,/])[-−+])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?![.,]\d))?"
)
_SPACES = re.compile(r"\s+")


def normalize(text: str, case_sensitive: bool = False) -> str:
    """Strip, collapse whitespace to one space, drop trailing periods, casefold (unless case_sensitive)."""
    text = _SPACES.sub(" ", text).strip().rstrip(".").rstrip()
    return text if case_sensitive else text.casefold()


def parse_numbers(text: str) -> list[float]:
    """Every number in `text`, in order (see the module docstring for what counts as one)."""
    values = []
    for m in _NUMBER.finditer(text):
        value = Fraction(m["num"].replace(",", ""))
        if m["den"] is not None and int(m["den"]) != 0 and "." not in m["num"]:
            value /= int(m["den"])
        if m["sign"] in ("-", "−"):
            value = -value
        values.append(float(value))
    return values


def parse_answer_number(answer: Any) -> float:
    """The example's `answer` as a number; raise ValueError if it is not exactly one number."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"'answer' must be a number or a string holding one, got {type(answer).__name__}")
    if isinstance(answer, (int, float)):
        return float(answer)
    numbers_found = parse_numbers(answer)
    rest = _NUMBER.sub("", answer).strip()
    if len(numbers_found) != 1 or rest not in ("", ".", "$", "%"):
        raise ValueError(f"'answer' {answer!r} is not a single number (e.g. 42, -3.5, 1,234 or 3/4)")
    return numbers_found[0]


def exact_match(response: str, example: dict, *, case_sensitive: bool = False) -> float:
    return float(normalize(response, case_sensitive) == normalize(str(example["answer"]), case_sensitive))


def numeric(response: str, example: dict, *, tolerance: float = 1e-6) -> float:
    found = parse_numbers(response)
    if not found:
        return 0.0
    return float(abs(found[-1] - parse_answer_number(example["answer"])) <= tolerance)


def regex(response: str, example: dict, *, pattern: str | None = None, case_sensitive: bool = False) -> float:
    flags = 0 if case_sensitive else re.IGNORECASE
    return float(re.search(pattern or str(example["answer"]), response, flags) is not None)


def contains(response: str, example: dict, *, case_sensitive: bool = False) -> float:
    return float(normalize(str(example["answer"]), case_sensitive) in normalize(response, case_sensitive))


def builtin_reward(name: str, cfg) -> RewardFn:
    """The built-in `name` with its options from `cfg` (a RewardsSignal) bound."""
    if name == "exact_match":
        return functools.partial(exact_match, case_sensitive=cfg.case_sensitive)
    if name == "numeric":
        return functools.partial(numeric, tolerance=cfg.tolerance)
    if name == "regex":
        return functools.partial(regex, pattern=cfg.pattern, case_sensitive=cfg.case_sensitive)
    if name == "contains":
        return functools.partial(contains, case_sensitive=cfg.case_sensitive)
    raise KeyError(name)


def check_answer(name: str, cfg, example: dict) -> str | None:
    """What is wrong with this data line for built-in reward `name` (None when it is fine)."""
    if name == "regex" and cfg.pattern:
        return None
    if "answer" not in example:
        return f"missing 'answer' (reward '{name}' compares the response with it)"
    answer = example["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return f"'answer' must be a string or a number, got {type(answer).__name__}"
    if name == "numeric":
        try:
            parse_answer_number(answer)
        except ValueError as e:
            return str(e)
    elif name == "regex":
        try:
            re.compile(str(answer))
        except re.error as e:
            return f"'answer' {answer!r} is not a valid regular expression ({e}); escape special characters"
    elif not normalize(str(answer)):
        return "'answer' is empty"
    return None


def load_reward(spec: str, cfg, search_dirs: Sequence[Path] = ()) -> RewardFn:
    """A built-in name or `package.module:function` -> a callable (response, example) -> float."""
    if spec in BUILTIN_REWARDS:
        return builtin_reward(spec, cfg)
    return check_callable(
        spec, "signal.reward", "(response: str, example: dict) -> float", BUILTIN_REWARDS, search_dirs
    )


def check_callable(
    spec: str, key: str, shape: str, builtins: Sequence[str], search_dirs: Sequence[Path] = ()
) -> Callable:
    """Import `package.module:function` and check it can be called with two positional arguments.

    Raises RecipeError saying what is wrong, where (the recipe key) and how to fix it. `shape`
    describes the expected signature in messages; `builtins` are the names accepted instead.
    """
    where = f"'{key}' is {spec!r}"
    expect = f"Write a built-in name ({', '.join(builtins)}) or package.module:function, a function{shape}."
    module_name, sep, attr = spec.partition(":")
    dotted = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
    if not sep or not dotted.match(module_name) or not attr.isidentifier():
        close = difflib.get_close_matches(spec, builtins, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"{where}: not a built-in and not of the form package.module:function.{hint}", hint=expect)
    for folder in [*search_dirs, Path.cwd()]:
        folder = str(Path(folder).resolve())
        if folder not in sys.path:
            sys.path.append(folder)  # appended: never shadows an installed package
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            folders = list(dict.fromkeys(str(Path(p).resolve()) for p in [*search_dirs, Path.cwd()]))
            raise RecipeError(
                f"{where}: module '{module_name}' not found (looked on sys.path, which includes {', '.join(folders)}).",
                hint=f"Put {module_name.replace('.', '/')}.py in {' or '.join(folders)} (or a folder on PYTHONPATH), "
                "or install the package that provides it; check the spelling.",
            ) from None
        raise RecipeError(
            f"{where}: importing '{module_name}' failed: it needs module '{e.name}', which is not installed.",
            hint=f"Install it (pip install {e.name.split('.')[0]}) in the environment that runs sd.",
        ) from None
    except SystemExit as e:  # sys.exit() at import time would otherwise end sd silently with its code
        raise RecipeError(
            f"{where}: importing '{module_name}' called sys.exit({e.code!r}); a reward or environment module "
            "must not exit when it is imported.",
            _where_it_failed(),
            hint=f"Move the exit in {module_name} under `if __name__ == \"__main__\":`, or remove it.",
        ) from None
    except Exception as e:
        raise RecipeError(
            f"{where}: importing '{module_name}' raised {type(e).__name__}: {e}",
            _where_it_failed(),
            hint=f"Fix the error in {module_name}; `python -c 'import {module_name}'` shows it too.",
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = (
            f"did you mean '{module_name}:{close[0]}'?"
            if close
            else f"functions there: {', '.join(sorted(names)[:12]) or 'none'}"
        )
        raise RecipeError(
            f"{where}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no '{attr}'; {hint}",
            hint=expect,
        )
    if not callable(fn):
        raise RecipeError(
            f"{where}: '{attr}' in '{module_name}' is a {type(fn).__name__}, not a function.", hint=expect
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # a builtin or C function without a signature: trust it
    try:
        signature.bind("response", {})
    except TypeError as e:
        raise RecipeError(
            f"{where}: {attr}{signature} in {getattr(module, '__file__', module_name)} cannot be called as "
            f"{attr}(response, example) ({e}).",
            hint=f"sd calls it with two positional arguments; define it as def {attr}(response, example): ...",
        ) from None
    return fn


def _where_it_failed() -> list[str]:
    """Where the exception being handled came from in the user's code: its frames outside Python's
    import machinery and sd, one line each, then the exception (a message, not a crash dump)."""
    _, error, tb = sys.exc_info()
    here = Path(__file__).resolve().parent
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith("<") and "importlib" not in f.filename and Path(f.filename).resolve().parent != here]
    lines = [f"{f.filename}, line {f.lineno}, in {f.name}: {(f.line or '').strip()}" for f in frames[-4:]]
    return lines + [f"{type(error).__name__}: {error}"]


def call_reward(fn: Callable, response: str, example: dict, example_id: str) -> tuple[float | None, str | None]:
    """(reward, None), or (None, message) when the function raised or returned a non-number."""
    try:
        value = fn(response, example)
    except (Exception, SystemExit) as e:  # SystemExit too: a stray sys.exit() must not end training
        return None, f"{example_id}: reward function {callable_name(fn)} raised {type(e).__name__}: {e}"
    return as_reward(value, fn, example_id)


def as_reward(value: Any, fn: Callable, example_id: str) -> tuple[float | None, str | None]:
    """A returned value as a finite float, or (None, message) saying what was returned instead."""
    if isinstance(value, numbers.Real) or (hasattr(value, "__float__") and not isinstance(value, (str, bytes))):
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            return None, f"{example_id}: {callable_name(fn)} returned {show_value(value)}, which is not a number ({e})"
        if math.isfinite(number):
            return number, None
        return None, f"{example_id}: {callable_name(fn)} returned {number}; a reward must be a finite number"
    return None, f"{example_id}: {callable_name(fn)} returned {show_value(value)}; a reward must be a number"


def callable_name(fn: Callable) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial of a built-in
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def show_value(value: Any) -> str:
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"
