"""JSONL reading and the chat-message shape shared by every signal.

A bad line is never skipped silently: `read_jsonl` collects every problem with its line number
and raises one `DataError` listing them all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from sdcli.errors import DataError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for every non-blank line; raise DataError listing every bad line."""
    problems: list[str] = []
    records: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                continue
            records.append((number, obj))
    if problems:
        raise DataError(f"{path}: {len(problems)} bad line(s):", problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else []))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty).")
    yield from records


def as_messages(value: Any, what: str = "prompt") -> Messages:
    """A prompt is a string (one user turn) or a list of {role, content} messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{what}' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"'{what}[{i}]' must be an object with string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"'{what}[{i}].role' is {m['role']!r}; expected one of {', '.join(ROLES)}")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user":
            raise ValueError(f"'{what}' must end with a user message (got {messages[-1]['role']!r})")
        return messages
    raise ValueError(f"'{what}' must be a string or a non-empty list of messages, got {type(value).__name__}")


def last_user_text(messages: Messages) -> str:
    return messages[-1]["content"]


def with_last_user_text(messages: Messages, text: str) -> Messages:
    """The same conversation with its final user turn replaced (the teacher's view of it)."""
    return [*messages[:-1], {"role": "user", "content": text}]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
