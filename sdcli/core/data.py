"""JSONL reading and the chat-message shape shared by every signal.

A bad line is never skipped silently: a pass over the file (`JsonlScan`, `read_jsonl`) collects
every problem with its line number and raises one `DataError` listing them all.

Training data is not held in memory: a signal checks every line once, keeps where its examples'
lines start (`LineIndex`), and reads a line again when training asks for its example
(`LazyRecords`), so a million-line file costs megabytes, not gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from sdcli.core.errors import DataError, UserError

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


def _open_jsonl(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a JSONL file.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from None


def file_stamp(f: BinaryIO) -> tuple[int, int]:
    """(size, mtime_ns) of an open file: what tells, cheaply, that it was written to."""
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def _parse_line(raw: bytes, path: Path, number: int, problems: list[str]) -> dict[str, Any] | None:
    """One line's JSON object; None for a blank line, or a bad one (its problem added to `problems`)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(utf8_problem(raw, e, str(path), first_line=number))
        return None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
        return None
    except RecursionError:
        problems.append(f"{path}:{number}: nested too deeply to read (thousands of levels of [ or {{); "
                        "an example needs a few")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        return None
    return obj


class JsonlScan:
    """One streaming pass over a JSONL file: iterating yields (line_number, offset, object) for every
    good non-blank line, `offset` being where the line starts, to read it again later (`LazyRecords`).

    Bad lines are not yielded; their problems are collected, and when the pass ends one DataError
    lists them all. The caller checks its own rules on each line as it goes and keeps only what it
    needs, so a file of any size is read in the memory of one line. `stamp` is the file's
    (size, mtime_ns) as it was read, set once the pass is over.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stamp: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        path, problems, kept = self.path, [], 0
        with _open_jsonl(path) as f:
            stamp = file_stamp(f)
            utf16 = _utf16_problem(f.read(2), str(path))
            if utf16:
                raise DataError(utf16)
            f.seek(0)
            offset = 0
            for number, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if number == 1 and raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
                obj = _parse_line(raw, path, number, problems)
                if obj is not None:
                    kept += 1
                    yield number, start, obj
            if file_stamp(f) != stamp or offset != stamp[0]:
                raise DataError(f"{path}: changed while sd was reading it.", hint=_CHANGED_HINT)
        self.stamp = stamp
        if problems:
            raise DataError(f"{path}: {len(problems)} bad line(s):", problems)
        if not kept:
            raise DataError(f"{path}: no examples (the file is empty).")


_CHANGED_HINT = ("Leave the data file as it is while sd uses it; to train on a log that is still being written, "
                 "copy it and train on the copy.")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for every non-blank line; raise DataError listing every bad line,
    before yielding any. It holds the whole file: for small files (eval sets, anchor prompts);
    training data goes through `JsonlScan` and `LazyRecords`."""
    records = [(number, obj) for number, _, obj in JsonlScan(path)]
    yield from records


class LineIndex:
    """Where the kept lines of a JSONL file start, and their line numbers: 12 bytes a line (16 with
    `sub`, a number of the caller's per item, e.g. which turn of a conversation), where the parsed
    line would take a kilobyte or more."""

    def __init__(self, with_sub: bool = False):
        self.offsets = array("q")
        self.lines = array("I")
        self.subs = array("I") if with_sub else None

    def add(self, offset: int, line: int, sub: int = 0) -> None:
        self.offsets.append(offset)
        self.lines.append(line)
        if self.subs is not None:
            self.subs.append(sub)

    def __len__(self) -> int:
        return len(self.offsets)


class _Reader:
    """An open data file that hands back the object on a line, after checking the file is still the
    one that was loaded (size and mtime, on every read: a stat costs a microsecond)."""

    def __init__(self, path: Path, file: Path, stamp: tuple[int, int]):
        self.path, self.stamp = path, stamp
        try:
            self.f = open(file, "rb")
        except OSError as e:
            raise DataError(f"{path}: cannot be read again ({e.strerror or e}); sd reads each example from the "
                            "file when training reaches it, so the file must stay where it was.", hint=_CHANGED_HINT) from None

    def record(self, offset: int, line: int) -> dict[str, Any]:
        f = self.f
        if file_stamp(f) != self.stamp:
            raise self.changed(line)
        # A line starts right after a newline: a cheap second check, for a file rewritten within
        # the mtime's resolution to the same size.
        f.seek(offset - 1 if line > 1 else offset)
        raw = f.readline()
        if line > 1:
            if raw != b"\n":
                raise self.changed(line)
            raw = f.readline()
        obj = _parse_line(raw, self.path, line, [])
        if obj is None:
            raise self.changed(line)
        return obj

    def changed(self, line: int) -> DataError:
        return DataError(
            f"{self.path}: changed since sd loaded it (reading line {line} again); sd reads each example "
            "from the file when training reaches it, so the file must stay as it was.",
            hint=_CHANGED_HINT,
        )

    def close(self) -> None:
        self.f.close()


class LazyRecords(Sequence):
    """A read-only sequence of the items made from the kept lines of a JSONL file, of which it holds
    only a `LineIndex`: item k is `build(line, object, sub)` for the k-th kept line, read and parsed
    again from the file each time it is asked for (tens of microseconds). Slices are LazyRecords too.

    `build` is the function that made the item when the file was loaded and checked, so an item is
    the same each time; a ValueError from it, or a line that no longer parses, means the file
    changed, and is a DataError.
    """

    def __init__(self, path: Path, stamp: tuple[int, int], index: LineIndex, build: Callable[[int, dict, int], Any],
                 rows: range | None = None):
        self.path, self.stamp, self._index, self.build = Path(path), stamp, index, build
        self._file = self.path.absolute()  # read from the same file if the process changes folder
        self.rows = range(len(index)) if rows is None else rows

    def _reader(self) -> _Reader:
        return _Reader(self.path, self._file, self.stamp)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyRecords(self.path, self.stamp, self._index, self.build, self.rows[i])
        row = self.rows[i]  # a range indexes as a list does: negative indices, IndexError
        reader = self._reader()
        try:
            return self._item(reader, row)
        finally:
            reader.close()

    def __iter__(self):
        reader = self._reader()
        try:
            for row in self.rows:
                yield self._item(reader, row)
        finally:
            reader.close()

    def line(self, i: int) -> int:
        """The line number of item i in the file."""
        return self._index.lines[self.rows[i]]

    def _item(self, reader: _Reader, row: int) -> Any:
        index = self._index
        line = index.lines[row]
        obj = reader.record(index.offsets[row], line)
        try:
            return self.build(line, obj, index.subs[row] if index.subs is not None else 0)
        except ValueError:
            raise reader.changed(line) from None

    def __repr__(self) -> str:
        return f"<LazyRecords: {len(self)} item(s) from {self.path}>"


def example_id(path: Path, line: int, record: dict) -> str:
    """A line's name in messages: its "id" (a non-empty string or an integer), else FILE:LINE.
    The rule of the rewards and feedback signals and of eval sets."""
    given = record.get("id")
    return (
        str(given)
        if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given)
        else f"{path.name}:{line}"
    )


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
