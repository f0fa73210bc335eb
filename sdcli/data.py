"""JSONL reading and the chat-message shape shared by every signal.

A bad line is never skipped silently: `read_jsonl` collects every problem with its line number
and raises one `DataError` listing them all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from sdcli.errors import DataError, UserError

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
_BOM = b"\xef\xbb\xbf"  # a byte-order mark some editors write at the start of a UTF-8 file


def utf8_problem(raw: bytes, e: UnicodeDecodeError, where: str, first_line: int = 1) -> str:
    """Where `raw` (which starts at line `first_line` of `where`) stops being UTF-8, as
    `where:line: ...` with the byte and column, and what to do about it."""
    line = first_line + raw.count(b"\n", 0, e.start)
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"{where}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); sd reads text files "
            "as UTF-8. A Latin-1 or Windows-1252 export (Excel, older editors) looks like this: convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {where} > converted{Path(where).suffix}")


def _utf16_problem(start: bytes, where: str) -> str | None:
    """A file that starts with a UTF-16 byte-order mark: one message for the file, not one per line."""
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return (f"{where}: the file is UTF-16 (a \"Unicode\" export from Windows tools); sd reads text files as UTF-8. "
                f"Convert it, e.g. iconv -f utf-16 -t utf-8 {where} > converted{Path(where).suffix}")
    return None


def read_text(path: Path, error: type[UserError] = DataError) -> str:
    """A text file as UTF-8 (a leading byte-order mark is dropped); `error` names the file, line and
    byte when it is not UTF-8, or when it cannot be read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a file.") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e}).") from None
    if _utf16_problem(raw, str(path)):
        raise error(_utf16_problem(raw, str(path)))
    raw = raw.removeprefix(_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(utf8_problem(raw, e, str(path))) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for every non-blank line; raise DataError listing every bad line."""
    path = Path(path)
    problems: list[str] = []
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a JSONL file.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from None
    with f:
        utf16 = _utf16_problem(f.read(2), str(path))
        if utf16:
            raise DataError(utf16)
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(utf8_problem(raw, e, str(path), first_line=number))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                problems.append(f"{path}:{number}: nested too deeply to read (thousands of levels of [ or {{); "
                                "an example needs a few")
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
