"""Rewards: a verifier scores the samples, and a successful sibling becomes the teacher's example.

SDPO ("Reinforcement Learning via Self-Distillation"): for each prompt the student samples G
responses and a reward function scores each one. For sample i, the teacher is shown a
*successful sibling*: another sample j != i of the same prompt with reward >= success_threshold,
rendered through `solution_template` ({prompt} = the student's final user text, {solution} = the
sibling). The teacher's token probabilities on sample i then carry the credit assignment.

    student:  prompt                                  -> sample i
    teacher:  solution_template(prompt, sample j)     -> scores the same sample i

Which sibling: the successful one with the highest reward, the earliest on ties; never i itself.
With strip_thinking, <think>...</think> is removed from it first (a sibling that is empty after
that is passed over). A view is masked (messages=None, no loss) with masked_reason:

- "skipped_successful": sample i succeeded and skip_successful is set;
- "no_successful_sibling": no other sample of this prompt succeeded;
- "reward_error": the reward function raised or returned a non-number; the message, which
  starts with the example id, is in `feedback` and is logged as a warning. The run goes on.

Data: one JSON object per line, `{"id"?: str, "prompt": str | messages, "answer": ...}`; an
optional `"demonstration"` (a reference solution) can also be trained on off-policy. The
whole line is the `example` dict given to the reward function, so a user reward may read any
other key. Ids are "<file>:<line>" unless the line has an "id". Every bad line is reported at
once, with its line number.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdcli.core.data import JsonlScan, LazyRecords, LineIndex, as_messages, example_id, last_user_text
from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import RewardsSignal
from sdcli.signals.base import Example, LoadReport, Pieces, TeacherView, context, context_view, fill
from sdcli.verification.scorers import (
    BUILTIN_REWARDS,
    RewardFn,
    call_reward,
    check_answer,
    load_reward,
)

log = logging.getLogger(__name__)

SKIPPED_SUCCESSFUL = "skipped_successful"
NO_SUCCESSFUL_SIBLING = "no_successful_sibling"
REWARD_ERROR = "reward_error"

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Shared with the feedback signal


def line_example(path: Path, line: int, record: dict, check: Callable[[dict], list[str]]) -> Example:
    """The example on one line; a ValueError whose args are every problem with the line.
    `check(record)` lists what else the signal needs of a line. `fields` is the whole line."""
    problems = []
    try:
        prompt = as_messages(record.get("prompt"), "prompt")
    except ValueError as e:
        problems.append(str(e) if "prompt" in record else "missing 'prompt'")
    given = record.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int)) or str(given) == ""):
        problems.append(f"'id' must be a non-empty string or an integer, got {given!r}")
    problems += check(record)
    if problems:
        raise ValueError(*problems)
    return Example(id=example_id(path, line, record), prompt=prompt, fields=dict(record))


def load_examples(path: Path, signal: str, check: Callable[[dict], list[str]], hint: str) -> LoadReport:
    """Check every line of a JSONL file and index its examples (`line_example` makes each one, then
    and when it is read again); warn about ids used twice.

    Raises DataError listing every bad line as file:line: problem.
    """
    path = Path(path)
    problems: list[str] = []
    index, scan = LineIndex(), JsonlScan(path)
    id_hashes = array("q")  # the one fact about a line the duplicate check needs, 8 bytes of it
    for line, offset, record in scan:
        try:
            example = line_example(path, line, record, check)
        except ValueError as e:
            problems += [f"{path}:{line}: {p}" for p in e.args]
            continue
        index.add(offset, line)
        id_hashes.append(hash(example.id))
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s) for signal '{signal}':", problems, hint=hint)
    examples = LazyRecords(path, scan.stamp, index, lambda line, record, _: line_example(path, line, record, check))
    return LoadReport(examples, warnings=duplicate_id_warnings(examples, id_hashes))


def duplicate_id_warnings(examples: LazyRecords, id_hashes: array) -> list[str]:
    """`file:line: id 'x' was already used on line N`, in line order, for every example whose id an
    earlier one has. Only the lines whose id hash is not unique are read again (none, usually), and
    their ids compared as strings, so two ids that share a hash are not taken for one."""
    import numpy as np  # sorts a million hashes in milliseconds, where a set of them would take ~80 MB

    hashes = np.frombuffer(id_hashes, dtype=np.int64) if len(id_hashes) else np.zeros(0, dtype=np.int64)
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    warnings: list[str] = []
    first_line: dict[str, int] = {}
    for row in np.flatnonzero(np.isin(hashes, repeated)).tolist():
        ex_id, line = examples[row].id, examples.line(row)
        if ex_id in first_line:
            warnings.append(f"{examples.path}:{line}: id {ex_id!r} was already used on line {first_line[ex_id]}")
        first_line.setdefault(ex_id, line)
    return warnings


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> blocks; also an unclosed one (to the end) and a dangling </think>
    (everything before it: the opening tag may have been part of the prompt)."""
    text = _THINK_BLOCK.sub("", text)
    close = text.lower().rfind("</think>")
    if close != -1:
        text = text[close + len("</think>") :]
    start = text.lower().find("<think>")
    if start != -1:
        text = text[:start]
    return text.strip()


def sibling_solution(
    i: int, responses: Sequence[str], rewards: Sequence[float | None], success: Sequence[bool], strip: bool
) -> str | None:
    """The text of sample i's best successful sibling (never i itself), or None."""
    order = sorted((j for j in range(len(responses)) if j != i and success[j]), key=lambda j: (-rewards[j], j))
    for j in order:
        text = strip_thinking(responses[j]) if strip else responses[j].strip()
        if text:
            return text
    return None


def render_solution(template: str, prompt: str | Pieces, solution: str) -> Pieces:
    """The solution template in pieces, the solution being the context."""
    return fill(template, prompt=prompt, solution=context(solution))


def reference_solution_view(template: str, example: Example) -> tuple[str, TeacherView] | None:
    """A line's optional `"demonstration"` (a reference solution) as an off-policy response, shown
    to the teacher through the solution template, as a successful sibling would be."""
    solution = example.fields.get("demonstration")
    if not isinstance(solution, str) or not solution.strip():
        return None
    pieces = render_solution(template, last_user_text(example.prompt), solution.strip())
    return solution.strip(), context_view(example.prompt, pieces)


def masked(reason: str, **kw: Any) -> TeacherView:
    return TeacherView(messages=None, masked_reason=reason, **kw)


# ---------------------------------------------------------------------------------------------


class RewardsBuilder:
    def __init__(self, cfg: RewardsSignal, search_dirs: Sequence[Path] = ()):
        """search_dirs: folders to import a user reward module from (the current folder is always one).

        A user reward is imported on first use, or by `check()`, which `sd validate` calls.
        """
        self.cfg = cfg
        self.search_dirs = list(search_dirs)
        self._reward_fn: RewardFn | None = None

    @property
    def reward_fn(self) -> RewardFn:
        if self._reward_fn is None:
            self._reward_fn = load_reward(self.cfg.reward, self.cfg, self.search_dirs)
        return self._reward_fn

    @reward_fn.setter
    def reward_fn(self, fn: RewardFn) -> None:
        self._reward_fn = fn

    def check(self) -> None:
        """Import the reward function and check its signature; raise RecipeError saying how to fix it."""
        _ = self.reward_fn

    def load(self, path: Path) -> LoadReport:
        name = self.cfg.reward
        if name in BUILTIN_REWARDS:

            def check(record: dict) -> list[str]:
                problem = check_answer(name, self.cfg, record)
                return [problem] if problem else []

            hint = f'Each line needs {{"prompt": "..." or [messages], "answer": ...}} for reward \'{name}\'.'
        else:

            def check(record: dict) -> list[str]:
                return []

            hint = f'Each line needs {{"prompt": "..." or [messages]}} plus whatever {name} reads.'
        return load_examples(path, "rewards", check, hint)

    def demonstration_view(self, example: Example) -> tuple[str, TeacherView] | None:
        return reference_solution_view(self.cfg.solution_template, example)

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        cfg = self.cfg
        scored = [call_reward(self.reward_fn, r, example.fields, example.id) for r in responses]
        rewards = [reward for reward, _ in scored]
        success = [r is not None and r >= cfg.success_threshold for r in rewards]
        prompt_text = last_user_text(example.prompt)
        views = []
        for i, (reward, error) in enumerate(scored):
            if error is not None:
                log.warning(error)
                views.append(masked(REWARD_ERROR, feedback=error))
                continue
            if success[i] and cfg.skip_successful:
                views.append(masked(SKIPPED_SUCCESSFUL, reward=reward, success=True))
                continue
            solution = sibling_solution(i, responses, rewards, success, cfg.strip_thinking)
            if solution is None:
                views.append(masked(NO_SUCCESSFUL_SIBLING, reward=reward, success=success[i]))
                continue
            pieces = render_solution(cfg.solution_template, prompt_text, solution)
            views.append(context_view(example.prompt, pieces, reward=reward, success=success[i]))
        return views
