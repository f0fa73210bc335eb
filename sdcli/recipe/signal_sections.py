"""The recipe's `signal:` section: one schema per kind of learning signal (demonstrations,
rewards, feedback, interactions), their default teacher prompts and the check of a template's
{fields}. `SIGNAL_CLASSES` is the one list of the kinds."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, field_validator

from sdcli.recipe.sections import StrictSection

DEFAULT_DEMONSTRATION_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own."
)
DEFAULT_SOLUTION_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a correct solution to this problem:\n"
    "{solution}\n\n"
    "Now solve the problem yourself, correctly."
)
DEFAULT_FEEDBACK_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier attempt at this task failed. Here is the feedback from running it:\n"
    "{feedback}\n\n"
    "Now solve the task correctly, avoiding that mistake."
)
DEFAULT_SUCCESS_FEEDBACK_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier attempt at this task succeeded. Here is the feedback from running it:\n"
    "{feedback}\n\n"
    "Now solve the task correctly."
)
DEFAULT_HINDSIGHT_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier answer to this message was not good enough. This is what the user said in "
    "reply to it:\n"
    "{followup}\n\n"
    "Taking that reply into account, give an improved answer to the user's message."
)
DEFAULT_SIMULATOR_TEMPLATE = (
    "You are the user in a conversation with an AI assistant. Write the user's next message.\n\n"
    "The conversation so far:\n"
    "{conversation}\n\n"
    "The assistant's latest reply:\n"
    "{response}\n\n"
    "What the user wants, as shown by what they said next in the real conversation (to an earlier "
    "version of that reply):\n"
    "{followup}\n\n"
    "Write the user's next message, reacting to the assistant's latest reply above with that intent. "
    "If the reply already gives the user what they want, say so briefly. Write only the message."
)


class DemonstrationsSignal(StrictSection):
    kind: Literal["demonstrations"] = Field("demonstrations", description="The teacher sees an example answer")
    teacher_template: str = Field(
        DEFAULT_DEMONSTRATION_TEMPLATE, description="Teacher's user turn; fields {prompt} and {demonstration}"
    )

    @field_validator("teacher_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"demonstration"}, allowed={"prompt", "demonstration"})


class RewardsSignal(StrictSection):
    kind: Literal["rewards"] = Field("rewards", description="The teacher sees a successful sibling sample")
    reward: str = Field(
        "exact_match", description="exact_match | numeric | regex | contains | package.module:function"
    )
    tolerance: float = Field(1e-6, ge=0, description="numeric: absolute tolerance")
    pattern: str | None = Field(None, description="regex: pattern the response must match (else the example's `answer`)")
    case_sensitive: bool = Field(False, description="Built-in rewards compare case")
    success_threshold: float = Field(1.0, description="A sample with reward >= this is a success")
    skip_successful: bool = Field(False, description="Samples that already succeeded contribute no loss")
    strip_thinking: bool = Field(True, description="Remove <think>...</think> from sibling demonstrations")
    solution_template: str = Field(DEFAULT_SOLUTION_TEMPLATE, description="Teacher's user turn; {prompt} and {solution}")

    @field_validator("solution_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"solution"}, allowed={"prompt", "solution"})


class SandboxLimits(StrictSection):
    wall_seconds: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per run")
    cpu_seconds: int = Field(10, ge=1, le=600, description="CPU-time limit (RLIMIT_CPU)")
    memory_mb: int = Field(512, ge=32, description="Address-space limit (RLIMIT_AS)")
    output_bytes: int = Field(64_000, ge=1024, description="stdout + stderr kept; more kills the run")
    max_processes: int = Field(16, ge=1, description="Per sandbox; stops fork bombs")


class FeedbackSignal(StrictSection):
    kind: Literal["feedback"] = Field("feedback", description="The teacher sees the environment's feedback on the sample")
    environment: str = Field("python_tests", description="python_tests | package.module:function")
    success_threshold: float = Field(1.0, description="A sample with reward >= this passed")
    use_successful_sibling: bool = Field(True, description="Also show a successful sibling's answer")
    skip_successful: bool = Field(False, description="Samples that passed contribute no loss")
    strip_thinking: bool = Field(True, description="Remove <think>...</think> from a sibling's answer")
    feedback_template: str = Field(
        DEFAULT_FEEDBACK_TEMPLATE, description="For a sample that failed; {prompt}, {feedback}, optional {solution}"
    )
    success_template: str = Field(
        DEFAULT_SUCCESS_FEEDBACK_TEMPLATE,
        description="For a sample that passed and still has feedback; {prompt}, {feedback}, optional {solution}",
    )
    solution_template: str = Field(DEFAULT_SOLUTION_TEMPLATE, description="Used for a passing sibling")
    max_feedback_chars: int = Field(1500, ge=100, description="Feedback text is cut to this length")
    sandbox: SandboxLimits = SandboxLimits()

    @field_validator("feedback_template", "success_template")
    @classmethod
    def _feedback_fields(cls, v: str) -> str:
        return _check_template(v, required={"feedback"}, allowed={"prompt", "feedback", "solution"})

    @field_validator("solution_template")
    @classmethod
    def _solution_fields(cls, v: str) -> str:
        return _check_template(v, required={"solution"}, allowed={"prompt", "solution"})


class UserSimulator(StrictSection):
    template: str = Field(
        DEFAULT_SIMULATOR_TEMPLATE,
        description="The simulator's user turn; {response} (the student's sample) and {followup} (the logged "
        "follow-up, as the user's intent), optional {conversation} (the history and the user's message) and {prompt}",
    )
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Longest simulated follow-up, in tokens")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (repeatable); above 0, sampled")

    @field_validator("template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"response", "followup"}, allowed={"conversation", "prompt", "response", "followup"})


class InteractionsSignal(StrictSection):
    kind: Literal["interactions"] = Field("interactions", description="The teacher sees the user's next message")
    mode: Literal["online", "online_logged_followup", "offline"] = Field(
        "online",
        description="online: y is sampled from the student and a user simulator (the base model, every adapter off) "
        "writes the follow-up to y that the teacher sees; online_logged_followup: y is sampled, the teacher sees the "
        "logged follow-up, which answered the logged reply, not y (cheaper: no simulator); offline: the logged reply "
        "is y (off-policy, nothing generated)",
    )
    simulator: UserSimulator = UserSimulator()
    hindsight_template: str = Field(DEFAULT_HINDSIGHT_TEMPLATE, description="{prompt}, {followup}, optional {response}")
    min_followup_chars: int = Field(0, ge=0, description="Shorter follow-ups are skipped (counted)")
    max_history_messages: int | None = Field(
        None, ge=1, description="Keep at most this many messages before the prompt (oldest dropped; system kept)"
    )
    include: str | None = Field(None, description="Regex the follow-up must match")
    exclude: str | None = Field(None, description="Regex the follow-up must not match")

    @field_validator("hindsight_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"followup"}, allowed={"prompt", "followup", "response"})

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v


# The signal kinds, each with its section's schema: the one list of them. The context builder of a
# kind is `sdcli.signals.<kind>` (sdcli.signals.build_signal).
SIGNAL_CLASSES: dict[str, type[BaseModel]] = {
    cls.model_fields["kind"].default: cls for cls in (DemonstrationsSignal, RewardsSignal, FeedbackSignal, InteractionsSignal)
}
SIGNAL_KINDS = tuple(SIGNAL_CLASSES)
SignalConfig = Annotated[Union[tuple(SIGNAL_CLASSES.values())], Field(discriminator="kind")]


def _check_template(template: str, required: set[str], allowed: set[str]) -> str:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    unknown = names - allowed
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - names
    if missing:
        raise ValueError(f"must contain {', '.join('{' + m + '}' for m in sorted(missing))}")
    return template

