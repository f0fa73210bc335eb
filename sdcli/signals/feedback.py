"""Feedback: run each sample in an environment; the teacher reads what went wrong (SDPO).

For each prompt the student samples G responses. Each one is run in an environment that returns
(reward, feedback text), for example the built-in `python_tests`, which runs the code against
the example's tests in a sandbox. The teacher sees the feedback on this very sample and, when
use_successful_sibling is set and another sample succeeded, that sibling's answer too:

    student:  prompt                                              -> sample i
    teacher:  feedback_template(prompt, feedback on i[, sibling])  -> scores the same sample i

How sample i's teacher turn is built, in order:

1. the environment raised or returned junk: masked, "environment_error" (the message, starting
   with the example id, is in `feedback` and is logged as a warning; the run goes on);
2. it succeeded (reward >= success_threshold) and skip_successful is set: masked,
   "skipped_successful";
3. it has feedback: `feedback_template` (it failed) or `success_template` (it passed: the
   failure template would tell the teacher it failed), with {prompt} and {feedback}. If a
   successful sibling is shown as well: a template with {solution} gets it there; a template
   without {solution} is followed by the sibling through `solution_template`, whose {prompt} is
   then the rendered feedback text (so the prompt is not repeated). A template with {solution}
   and no sibling to show gets NO_SOLUTION in its place;
4. no feedback (usually: it succeeded) but a successful sibling: `solution_template`;
5. otherwise masked, "no_context".

The sibling is chosen as in the rewards signal: the best successful other sample, never i itself,
with <think> blocks stripped when strip_thinking is set.

Data: one JSON object per line, `{"id"?: str, "prompt": str | messages, "tests"?: [...],
"test_code"?: str, "entry_point"?: str}`; the tests format is in verification/python_tests.py.
The whole line is the `example` dict given to the environment, so a user environment may read any
other key.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from pathlib import Path

from sdcli.core.data import last_user_text
from sdcli.core.errors import UserError
from sdcli.recipe.signal_sections import FeedbackSignal
from sdcli.signals.base import Example, LoadReport, Pieces, TeacherView, context, context_view, fill
from sdcli.signals.rewards import (
    SKIPPED_SUCCESSFUL,
    load_examples,
    masked,
    reference_solution_view,
    render_solution,
    sibling_solution,
)
from sdcli.verification.environments import EnvFn, call_environment, load_environment
from sdcli.verification.python_tests import check_python_tests
from sdcli.verification.sandbox import run_python

log = logging.getLogger(__name__)

ENVIRONMENT_ERROR = "environment_error"
NO_CONTEXT = "no_context"
NO_SOLUTION = "(no correct solution is available yet)"


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render_feedback(cfg: FeedbackSignal, template: str, prompt_text: str, feedback: str, solution: str | None) -> Pieces:
    """The teacher's user turn for a sample with feedback (step 3 in the module docstring), through
    `template`: the feedback template for a sample that failed, the success template for one that passed."""
    if "solution" in template_fields(template):
        shown = context(solution) if solution is not None else NO_SOLUTION
        return fill(template, prompt=prompt_text, feedback=context(feedback), solution=shown)
    pieces = fill(template, prompt=prompt_text, feedback=context(feedback))
    if solution is None:
        return pieces
    if "prompt" in template_fields(cfg.solution_template):
        return render_solution(cfg.solution_template, pieces, solution)
    return pieces + (("\n\n", False),) + render_solution(cfg.solution_template, prompt_text, solution)


def _no_check(record: dict) -> list[str]:
    return []  # a user environment decides what a line needs


class FeedbackBuilder:
    def __init__(self, cfg: FeedbackSignal, search_dirs: Sequence[Path] = ()):
        """search_dirs: folders to import a user environment module from (the current folder is always one)."""
        self.cfg = cfg
        self.search_dirs = list(search_dirs)
        self._environment: EnvFn | None = None

    @property
    def environment(self) -> EnvFn:
        """The environment function; a user one is imported on first use (or by `check()`)."""
        if self._environment is None:
            self._environment = load_environment(self.cfg.environment, self.cfg, self.search_dirs)
        return self._environment

    @environment.setter
    def environment(self, fn: EnvFn) -> None:
        self._environment = fn

    def check(self) -> None:
        """For `sd validate`: import a user environment, or run a trivial program in the sandbox."""
        _ = self.environment
        if self.cfg.environment == "python_tests":
            result = run_python("print('ok')", self.cfg.sandbox)
            if result.stdout != "ok\n":
                tail = "\n".join((result.stderr or result.killed_reason or "").strip().splitlines()[-5:])
                raise UserError(
                    f"signal.environment: python_tests cannot run Python in the sandbox here ({tail or 'no output'}).",
                    hint="Check signal.sandbox (memory_mb, wall_seconds); the sandbox needs Linux or macOS.",
                )

    def load(self, path: Path) -> LoadReport:
        if self.cfg.environment == "python_tests":
            check = check_python_tests
            hint = (
                'Each line needs {"prompt": ..., "tests": [{"input": "f(1)", "expected": "2"}, ...]} '
                'and/or "test_code": "assert f(1) == 2"; "entry_point": "f" is optional.'
            )
        else:
            check = _no_check
            hint = f'Each line needs {{"prompt": "..." or [messages]}} plus whatever {self.cfg.environment} reads.'
        report = load_examples(path, "feedback", check, hint)
        for key in ("feedback_template", "success_template"):
            if "solution" in template_fields(getattr(self.cfg, key)) and not self.cfg.use_successful_sibling:
                report.warnings.append(
                    f"signal.{key} uses {{solution}} but signal.use_successful_sibling is false: "
                    f"it will always read {NO_SOLUTION!r}."
                )
        return report

    def demonstration_view(self, example: Example) -> tuple[str, TeacherView] | None:
        return reference_solution_view(self.cfg.solution_template, example)

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        cfg = self.cfg
        outcomes = [
            call_environment(self.environment, r, example.fields, example.id, cfg.max_feedback_chars) for r in responses
        ]
        rewards = [reward for reward, _, _ in outcomes]
        success = [r is not None and r >= cfg.success_threshold for r in rewards]
        prompt_text = last_user_text(example.prompt)
        views = []
        for i, (reward, feedback, error) in enumerate(outcomes):
            if error is not None:
                log.warning(error)
                views.append(masked(ENVIRONMENT_ERROR, feedback=error))
                continue
            feedback = (feedback or "").strip() or None
            info = {"reward": reward, "success": success[i], "feedback": feedback}
            if success[i] and cfg.skip_successful:
                views.append(masked(SKIPPED_SUCCESSFUL, **info))
                continue
            solution = (
                sibling_solution(i, responses, rewards, success, cfg.strip_thinking)
                if cfg.use_successful_sibling
                else None
            )
            if feedback is not None:
                template = cfg.success_template if success[i] else cfg.feedback_template
                pieces = render_feedback(cfg, template, prompt_text, feedback, solution)
            elif solution is not None:
                pieces = render_solution(cfg.solution_template, prompt_text, solution)
            else:
                views.append(masked(NO_CONTEXT, **info))
                continue
            views.append(context_view(example.prompt, pieces, **info))
        return views
