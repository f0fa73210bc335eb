"""The one interface every learning signal implements: build the teacher's context.

The training loop knows nothing about where a context comes from. For each prompt it samples
responses from the student (or takes a logged response), then asks the signal, per response,
what the teacher sees. A `TeacherView` with `messages=None` means "no context for this sample":
it contributes no loss (it is masked), and the loop counts it.

Where an example carries a good response of its own (a demonstration, a reference solution),
`demonstration_view` hands it over with the teacher's view, and the loop can train the student on
that response too (off-policy), scored by the same teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sdcli.data import Messages


@dataclass
class Example:
    id: str  # "<file>:<line>", shown in every message about this example
    prompt: Messages  # what the student sees; ends with a user turn
    fields: dict[str, Any] = field(default_factory=dict)  # signal-specific data from the line
    response: str | None = None  # a logged response to train on (offline interactions); None = sample


@dataclass
class TeacherView:
    messages: Messages | None  # the teacher's prompt (ends with a user turn); None = masked
    reward: float | None = None
    success: bool | None = None
    feedback: str | None = None
    masked_reason: str | None = None  # why messages is None, e.g. "no_successful_sibling", "skipped_successful"


@dataclass
class LoadReport:
    examples: list[Example]
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
