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
message. In `offline` mode y is the logged reply (off-policy: the loss is on logged tokens and
nothing is generated); in `online` mode y is sampled from the student and the logged reply is
kept only in fields["logged_response"].

Simplifications: the follow-up must be the message right after the assistant turn, and the
teacher's context is put into the last user turn (the assistant turn the follow-up reacted to
is not shown unless the template asks for {response}; see `teacher_views`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdcli.recipe.config import InteractionsSignal
from sdcli.core.data import ROLES, JsonlScan, LazyRecords, LineIndex, Messages, last_user_text
from sdcli.core.errors import DataError
from sdcli.signals.base import Example, LoadReport, TeacherView, context, context_view, fill

# ShareGPT "from" values, mapped to chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

FORMATS_HINT = (
    "Each line is one conversation, either OpenAI style "
    "{\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}, ...]} "
    "or ShareGPT style {\"conversations\": [{\"from\": \"system\"|\"human\"|\"gpt\", \"value\": \"...\"}, ...]}."
)
MAX_PROBLEMS = 50

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


class InteractionsBuilder:
    """Context builder for `signal.kind: interactions`."""

    def __init__(self, cfg: InteractionsSignal):
        self.cfg = cfg
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
            shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else [])
            raise DataError(f"{path}: {len(problems)} bad line(s):", shown, hint=FORMATS_HINT)

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

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        """The teacher's prompt per response: the last user turn rewritten by the hindsight template.

        {prompt} is the user's message, {followup} the user's next message, and {response} the
        response being scored. The default template leaves {response} out: in online mode that
        response is a fresh sample the follow-up never reacted to, and showing the teacher the
        very text it scores invites it to copy rather than revise. In offline mode {response} is
        the logged reply, so a template that uses it shows the teacher the attempt the user
        answered, closer to the paper's full hindsight context.
        """
        prompt_text = last_user_text(example.prompt)
        followup = example.fields["followup"]
        views = []
        for response in responses:
            pieces = fill(self.cfg.hindsight_template, prompt=prompt_text, followup=context(followup), response=context(response))
            views.append(context_view(example.prompt, pieces, feedback=followup))
        return views
