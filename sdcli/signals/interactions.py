"""User interactions: learn from what the user said next, in hindsight.

A deployed assistant's logs hold follow-ups such as "no, I meant ..." or "that API changed". The
model can usually revise its answer once it has read such a follow-up, so the follow-up is the
teacher's privileged context (self-distillation from hindsight, as in "Aligning Language Models
from User Interactions", Kleine Buening et al., 2026):

    student sees   history + user message x                    -> answers y
    teacher sees   history + template(x, follow-up o [, y])     -> scores the same y

Every assistant turn that answers a user message and is itself answered by a user message
gives one example: prompt = the conversation up to and including that user message (system
prompts kept), response = the logged assistant reply, fields["followup"] = the user's next
message. Modes:

    offline                 y is the logged reply (off-policy: the loss is on logged tokens and
                            nothing is generated); o is the logged follow-up, which answered y.
    online (default)        y is sampled from the student, and o is a fresh follow-up to y, written
                            by a user simulator that is told the logged follow-up as the user's
                            intent (`simulator_prompt`). The paper's online method.
    online_logged_followup  y is sampled, o is the logged follow-up, which answered the logged
                            reply, not y: a cheaper approximation (no simulator pass), and the
                            only online mode before the simulator.

The simulator is a model, and this module imports none: the training loop hands one in with
`set_user_simulator(fn)`, fn(prompts) -> one follow-up per prompt, each prompt a TeacherView
(messages and pieces, so an over-long one is cut in its context). `step_teacher_views` asks it
once for all of a step's samples. In the online modes the logged reply is kept only in
fields["logged_response"].

Simplifications: the follow-up must be the message right after the assistant turn, and the
teacher's context is put into the last user turn (the assistant turn the follow-up reacted to
is not shown unless the template asks for {response}; see `teacher_views`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from collections.abc import Callable

from sdcli.core.data import ROLES, JsonlScan, LazyRecords, LineIndex, Messages, last_user_text
from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import InteractionsSignal
from sdcli.signals.base import Example, LoadReport, TeacherView, context, context_view, fill, joined

# A user simulator: one simulator prompt per sample in, one follow-up text per prompt out.
UserSimulatorFn = Callable[[list[TeacherView]], list[str]]
EMPTY_SIMULATED_FOLLOWUP = "empty_simulated_followup"  # masked: the simulator wrote nothing
ROLE_LABELS = {"user": "User", "assistant": "Assistant"}

# ShareGPT "from" values, mapped to chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

FORMATS_HINT = (
    "Each line is one conversation, either OpenAI style "
    "{\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}, ...]} "
    "or ShareGPT style {\"conversations\": [{\"from\": \"system\"|\"human\"|\"gpt\", \"value\": \"...\"}, ...]}."
)

# Skip reasons, in the order they are checked; an assistant turn is counted under the first that applies.
NO_USER_BEFORE = "no_user_before"  # the assistant turn does not answer a user message (opens the chat, or follows another assistant/system turn)
NO_FOLLOWUP = "no_followup"  # no user message right after the assistant turn
EMPTY_TURN = "empty_turn"  # the prompt, the reply or the follow-up is blank
FOLLOWUP_TOO_SHORT = "followup_too_short"
EXCLUDED_BY_REGEX = "excluded_by_regex"
NOT_INCLUDED_BY_REGEX = "not_included_by_regex"


def parse_conversation(obj: dict[str, Any]) -> Messages:
    """The line's conversation as {role, content} messages; raise ValueError saying what is wrong."""
    has_openai, has_sharegpt = "messages" in obj, "conversations" in obj
    if has_openai and has_sharegpt:
        raise ValueError("has both 'messages' and 'conversations'; use exactly one per line")
    if not has_openai and not has_sharegpt:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(f"found keys {keys}; expected 'messages' (OpenAI style) or 'conversations' (ShareGPT style)")
    key = "messages" if has_openai else "conversations"
    turns = obj[key]
    if not isinstance(turns, list):
        raise ValueError(f"'{key}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise ValueError(f"'{key}' is empty; a conversation needs at least a user and an assistant turn")
    return [_openai_turn(t, i) if has_openai else _sharegpt_turn(t, i) for i, t in enumerate(turns)]


def _openai_turn(turn: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(turn, dict):
        raise ValueError(f"'{where}' must be an object with 'role' and 'content', got {_type_name(turn)}")
    if "role" not in turn or "content" not in turn:
        hint = " (it looks like a ShareGPT turn: put those under 'conversations')" if "from" in turn or "value" in turn else ""
        raise ValueError(f"'{where}' has keys {_keys(turn)}; expected 'role' and 'content'{hint}")
    role = turn["role"]
    if role not in ROLES:
        raise ValueError(f"'{where}.role' is {role!r}; expected one of {', '.join(ROLES)}")
    return {"role": role, "content": _text(turn["content"], f"{where}.content")}


def _sharegpt_turn(turn: Any, i: int) -> dict[str, str]:
    where = f"conversations[{i}]"
    if not isinstance(turn, dict):
        raise ValueError(f"'{where}' must be an object with 'from' and 'value', got {_type_name(turn)}")
    if "from" not in turn or "value" not in turn:
        hint = " (it looks like an OpenAI turn: put those under 'messages')" if "role" in turn or "content" in turn else ""
        raise ValueError(f"'{where}' has keys {_keys(turn)}; expected 'from' and 'value'{hint}")
    sender = turn["from"]
    if sender not in SHAREGPT_ROLES:
        raise ValueError(f"'{where}.from' is {sender!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[sender], "content": _text(turn["value"], f"{where}.value")}


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    hint = " (multi-part content is not supported: join the text parts into one string)" if isinstance(value, list) else ""
    raise ValueError(f"'{where}' must be a string, got {_type_name(value)}{hint}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _keys(d: dict) -> str:
    return "[" + ", ".join(repr(k) for k in list(d)[:8]) + "]"


def truncate_history(prompt: Messages, max_history_messages: int | None) -> tuple[Messages, bool]:
    """Keep at most `max_history_messages` non-system messages before the final user turn.

    The oldest are dropped first. System messages are always kept, in place, and do not count.
    The kept history then starts at a user turn (a leading assistant turn is dropped too, so the
    chat template sees user/assistant alternation), which can leave one message fewer than the
    limit. Returns (messages, whether anything was dropped).
    """
    history, final = prompt[:-1], prompt[-1]
    turns = [j for j, m in enumerate(history) if m["role"] != "system"]
    if max_history_messages is None or len(turns) <= max_history_messages:
        return prompt, False
    kept = turns[len(turns) - max_history_messages :]
    while kept and history[kept[0]]["role"] != "user":
        kept.pop(0)
    keep = set(kept)
    return [m for j, m in enumerate(history) if m["role"] == "system" or j in keep] + [final], True


def transcript(messages: Messages) -> str:
    """The conversation as plain text, one "User: ..." / "Assistant: ..." block per turn; system
    prompts (instructions to the assistant, not something the user said) left out."""
    return "\n\n".join(f"{ROLE_LABELS[m['role']]}: {m['content']}" for m in messages if m["role"] in ROLE_LABELS)


def clean_followup(text: str) -> str:
    """The simulator's message as the user would send it: a leading "User:" label dropped (the
    transcript invites one), and anything from a line starting "Assistant:" on (the model writing
    the next turn too)."""
    text = text.strip()
    text = re.sub(r"^(?:user|the user)\s*:\s*", "", text, flags=re.IGNORECASE)
    text = re.split(r"(?im)^\s*assistant\s*:", text, maxsplit=1)[0]
    return text.strip()


class InteractionsBuilder:
    """Context builder for `signal.kind: interactions`."""

    def __init__(self, cfg: InteractionsSignal, user_simulator: UserSimulatorFn | None = None):
        self.cfg = cfg
        self.user_simulator = user_simulator
        # Patterns are searched anywhere in the follow-up; use (?i) for case-insensitive matching.
        self.include = re.compile(cfg.include) if cfg.include is not None else None
        self.exclude = re.compile(cfg.exclude) if cfg.exclude is not None else None

    def load(self, path) -> LoadReport:
        path = Path(path)
        problems: list[str] = []
        skipped: dict[str, int] = {}
        truncated = 0
        index, scan = LineIndex(with_sub=True), JsonlScan(path)  # sub: the assistant turn's message index
        for line, offset, obj in scan:
            try:
                messages = parse_conversation(obj)
            except ValueError as e:
                problems.append(f"{path}:{line}: {e}")
                continue
            for i, turn in enumerate(messages):
                if turn["role"] != "assistant":
                    continue
                example = self.turn_example(path, line, obj, messages, i)
                if isinstance(example, str):
                    skipped[example] = skipped.get(example, 0) + 1
                    continue
                truncated += len(example.prompt) < i  # fewer messages than came before the turn: history was cut
                index.add(offset, line, i)
        if problems:
            raise DataError(f"{path}: {len(problems)} bad line(s):", problems, hint=FORMATS_HINT)

        if not len(index):
            counts = [f"{reason}: {n}" for reason, n in skipped.items()] or ["the file has no assistant turns"]
            raise DataError(
                f"{path}: no examples: every assistant turn was skipped.",
                counts,
                hint="An example is an assistant turn between a user message and the user's follow-up; "
                "check signal.min_followup_chars, signal.include and signal.exclude.",
            )
        warnings = []
        if truncated:
            k = self.cfg.max_history_messages
            warnings.append(
                f"history cut to the last {k} message(s) before the prompt in {truncated} of {len(index)} "
                f"example(s) (signal.max_history_messages={k}; system prompts kept)"
            )
        examples = LazyRecords(path, scan.stamp, index, lambda line, obj, i: self.indexed_example(path, line, obj, i))
        return LoadReport(examples=examples, skipped=skipped, warnings=warnings)

    def turn_example(self, path: Path, line: int, obj: dict[str, Any], messages: Messages, i: int) -> Example | str:
        """The example for the assistant turn messages[i] of the conversation on `line`, or the
        reason it is skipped."""
        reason = self._skip_reason(messages, i)
        if reason is not None:
            return reason
        prompt, _ = truncate_history(messages[:i], self.cfg.max_history_messages)
        turn = messages[i]
        fields: dict[str, Any] = {"followup": messages[i + 1]["content"], "logged_response": turn["content"], "turn": i}
        if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
            fields["conversation_id"] = obj["id"]
        return Example(
            id=f"{path.name}:{line}#{i}",
            prompt=prompt,
            fields=fields,
            response=turn["content"] if self.cfg.mode == "offline" else None,
        )

    def indexed_example(self, path: Path, line: int, obj: dict[str, Any], i: int) -> Example:
        """The example `load` indexed at (line, turn i), made again from the line; ValueError when the
        line no longer gives one (the file changed)."""
        example = self.turn_example(path, line, obj, parse_conversation(obj), i)
        if isinstance(example, str):
            raise ValueError(example)
        return example

    def _skip_reason(self, messages: Messages, i: int) -> str | None:
        if i == 0 or messages[i - 1]["role"] != "user":
            return NO_USER_BEFORE
        if i + 1 >= len(messages) or messages[i + 1]["role"] != "user":
            return NO_FOLLOWUP
        prompt, response, followup = messages[i - 1]["content"], messages[i]["content"], messages[i + 1]["content"]
        if not prompt.strip() or not response.strip() or not followup.strip():
            return EMPTY_TURN
        if len(followup.strip()) < self.cfg.min_followup_chars:
            return FOLLOWUP_TOO_SHORT
        if self.exclude is not None and self.exclude.search(followup):
            return EXCLUDED_BY_REGEX
        if self.include is not None and not self.include.search(followup):
            return NOT_INCLUDED_BY_REGEX
        return None

    def demonstration_view(self, example: Example) -> None:
        """None: the logged reply is the one the user asked to improve, not a good response
        (offline mode already trains on it, under the hindsight teacher)."""
        return None

    @property
    def needs_user_simulator(self) -> bool:
        return self.cfg.mode == "online"

    def set_user_simulator(self, fn: UserSimulatorFn) -> None:
        """Hand in the user simulator the default online mode asks for its follow-ups."""
        self.user_simulator = fn

    def describe(self) -> str:
        """The mode in a line, for `sd validate`."""
        if self.cfg.mode == "offline":
            return "offline: y = the logged reply (nothing generated); the teacher sees the logged follow-up"
        if self.cfg.mode == "online_logged_followup":
            return ("online_logged_followup: y sampled from the student; the teacher sees the logged follow-up, "
                    "which answered the logged reply, not y (a cheaper approximation)")
        sim = self.cfg.simulator
        how = "greedy" if sim.temperature == 0 else f"temperature {sim.temperature:g}"
        return (f"online: y sampled from the student; a user simulator (the base model, every adapter off; {how}, "
                f"at most {sim.max_new_tokens} tokens) writes a follow-up to y, which the teacher sees")

    def simulator_prompt(self, example: Example, response: str) -> TeacherView:
        """What the user simulator sees for one sample: the conversation, the student's sampled reply
        and the logged follow-up as the user's intent, in `signal.simulator.template` (one user turn).
        Everything but the template's own words is context, so an over-long prompt is cut there."""
        pieces = fill(
            self.cfg.simulator.template,
            conversation=context(transcript(example.prompt)),
            prompt=context(last_user_text(example.prompt)),
            response=context(response),
            followup=context(example.fields["followup"]),
        )
        return TeacherView(messages=[{"role": "user", "content": joined(pieces)}], pieces=pieces)

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        """The teacher's prompt per response: the last user turn rewritten by the hindsight template.

        {prompt} is the user's message, {followup} the user's next message, and {response} the
        response being scored. The follow-up is the logged one (offline, online_logged_followup)
        or, in online mode, the simulator's follow-up to that very response. The default template
        leaves {response} out: in online_logged_followup mode that response is a fresh sample the
        follow-up never reacted to, and showing the teacher the very text it scores invites it to
        copy rather than revise. In offline mode {response} is the logged reply, so a template that
        uses it shows the teacher the attempt the user answered, closer to the paper's full
        hindsight context; so it is in online mode, where the follow-up answered the sample.
        """
        return self.step_teacher_views([example], [responses])[0]

    def step_teacher_views(self, examples: list[Example], responses: list[list[str]]) -> list[list[TeacherView]]:
        """`teacher_views` for every example of a step at once; in online mode the simulator is
        asked once, for every sample of the step together."""
        if self.cfg.mode != "online":
            return [[self._view(ex, r, ex.fields["followup"]) for r in rs] for ex, rs in zip(examples, responses)]
        if self.user_simulator is None:
            raise RuntimeError(
                "signal.mode: online needs a user simulator (set_user_simulator); "
                "sd train and sd inspect hand one in"
            )
        prompts = [self.simulator_prompt(ex, r) for ex, rs in zip(examples, responses) for r in rs]
        written = self.user_simulator(prompts) if prompts else []
        if len(written) != len(prompts):
            raise RuntimeError(f"the user simulator wrote {len(written)} follow-up(s) for {len(prompts)} prompt(s)")
        followups = iter(clean_followup(text) for text in written)
        out = []
        for ex, rs in zip(examples, responses):
            views = []
            for r in rs:
                followup = next(followups)
                if followup:
                    view = self._view(ex, r, followup)
                else:
                    view = TeacherView(messages=None, masked_reason=EMPTY_SIMULATED_FOLLOWUP)
                view.simulated_followup = followup
                views.append(view)
            out.append(views)
        return out

    def _view(self, example: Example, response: str, followup: str) -> TeacherView:
        pieces = fill(self.cfg.hindsight_template, prompt=last_user_text(example.prompt), followup=context(followup),
                      response=context(response))
        return context_view(example.prompt, pieces, feedback=followup)
