"""The one interface every learning signal implements: build the teacher's context.

The training loop knows nothing about where a context comes from. For each prompt it samples
responses from the student (or takes a logged response), then asks the signal, per response,
what the teacher sees. A `TeacherView` with `messages=None` means "no context for this sample":
it contributes no loss (it is masked), and the loop counts it.

Where an example carries a good response of its own (a demonstration, a reference solution),
`demonstration_view` hands it over with the teacher's view, and the loop can train the student on
that response too (off-policy), scored by the same teacher.

A view also keeps its last user turn in `pieces` (sdcli.core.prompts): the template's words and
the question in some, the context (demonstration, solution, feedback, follow-up) in others. When
the teacher's prompt is longer than it may be, only the context pieces are shortened
(`sdcli.models.sequences.TeacherPromptEncoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sdcli.core.data import Messages, with_last_user_text
# the signals' shared helpers for text in pieces (sdcli.core.prompts), imported from here by them
from sdcli.core.prompts import Pieces, context, fill, joined  # noqa: F401


@dataclass
class Example:
    id: str  # "<file>:<line>", shown in every message about this example
    prompt: Messages  # what the student sees; ends with a user turn
    fields: dict[str, Any] = field(default_factory=dict)  # signal-specific data from the line
    response: str | None = None  # a logged response to train on (offline interactions); None = sample
    visit: int = 0  # the pass over the data that handed it to this step (0 = the first): picks its off-policy response


@dataclass
class TeacherView:
    messages: Messages | None  # the teacher's prompt (ends with a user turn); None = masked
    reward: float | None = None
    success: bool | None = None
    feedback: str | None = None
    masked_reason: str | None = None  # why messages is None, e.g. "no_successful_sibling", "skipped_successful"
    pieces: Pieces | None = None  # the last user turn of `messages` in pieces; None: no context to cut
    simulated_followup: str | None = None  # interactions, online: the user simulator's follow-up to this sample


def context_view(prompt: Messages, pieces: Pieces, **info: Any) -> TeacherView:
    """The teacher's view: the student's prompt with its last user turn replaced by `pieces`."""
    return TeacherView(messages=with_last_user_text(prompt, joined(pieces)), pieces=pieces, **info)


def step_teacher_views(signal, examples: list[Example], responses: list[str], g: int) -> list[TeacherView]:
    """The views for a step's samples, `g` responses per example in order: one `teacher_views`
    call per example, or one `step_teacher_views` call for the whole step where the signal has it
    (interactions, whose user simulator then samples once per step for every response)."""
    groups = [responses[i * g : (i + 1) * g] for i in range(len(examples))]
    whole_step = getattr(signal, "step_teacher_views", None)
    if whole_step is not None:
        views = whole_step(examples, groups)
    else:
        views = [signal.teacher_views(ex, rs) for ex, rs in zip(examples, groups)]
    return [view for group in views for view in group]


@dataclass
class LoadReport:
    # A read-only sequence: the signals' is `LazyRecords`, which reads each example from the file
    # when it is asked for (len, indexing, slicing and iteration all work as on a list).
    examples: Sequence[Example]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, shown to the user
    warnings: list[str] = field(default_factory=list)


class ContextBuilder(Protocol):
    """One per signal kind. Pure Python: no model, no tokenizer."""

    def load(self, path) -> LoadReport:
        """Read the data file into examples; raise DataError listing every bad line."""
        ...

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        """One view per response, in order. May run a verifier or an environment."""
        ...

    def demonstration_view(self, example: Example) -> tuple[str, TeacherView] | None:
        """A good response that the example itself carries, with the teacher's view of it, for
        off-policy distillation (`rollout.off_policy_fraction`); None when it carries none."""
        ...
