"""Errors meant for people.

`UserError` is bad input (recipe, data, arguments, paths) or a place sd cannot write to (a
read-only folder, a full disk): the CLI prints its message and exits with code 2, never a
traceback. Anything else is a bug or an environment failure and exits with code 1.
"""

from __future__ import annotations

import errno
from pathlib import Path

# errors that mean "no room to write": a full disk, or the user's quota spent
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


# A message shows this many problems, then "... and N more": a file with a million bad lines
# still fits on a screen, and its headline gives the whole count.
SHOWN_PROBLEMS = 50


class UserError(Exception):
    """Bad input. `problems` holds one line per problem so that all of them are reported at once
    (the message shows the first SHOWN_PROBLEMS of them)."""

    def __init__(self, headline: str, problems: list[str] | None = None, hint: str | None = None):
        self.headline = headline
        self.problems = list(problems or [])
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.headline]
        shown = self.problems[:SHOWN_PROBLEMS]
        if len(self.problems) > SHOWN_PROBLEMS:
            shown.append(f"... and {len(self.problems) - SHOWN_PROBLEMS} more")
        lines += [f"  - {p}" for p in shown]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training, after the state of the last finished step was saved.
    `code` is the exit code: 128 + the signal's number, as a shell reports a process that signal
    stopped (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


class JobStopped(Exception):
    """A job of several ranks (torchrun) stops on every rank because one rank failed or was lost.

    `message` is what this rank prints: rank 0 says which rank failed and why, a rank that lost
    contact with the others says so, and the other ranks print nothing (None). `code` is the exit
    code one process would have exited with."""

    def __init__(self, message: str | None, code: int, label: str | None = "error", hint: str | None = None):
        self.message, self.code, self.label, self.hint = message, code, label, hint
        super().__init__(message or f"stopped with exit code {code}")

    def render(self) -> str | None:
        if self.message is None:
            return None
        text = f"{self.label}: {self.message}" if self.label else self.message
        return f"{text}\n{self.hint}" if self.hint else text


class DiskFullError(UserError):
    """The disk (or the user's quota) filled up while sd was writing `path`."""

    def __init__(self, path: Path | str | None, detail: str = ""):
        where = f" while writing {path}" if path else ""
        super().__init__(
            f"No space left on the device{where}{detail}.",
            hint="Free some space on that disk (df -h shows how much is left), or write somewhere else "
            "(run_dir=... for training, --out for the other commands), then run again.",
        )


def is_disk_full(e: BaseException) -> bool:
    """Whether `e`, or an exception it was raised from, says the disk is full. Libraries that write
    from native code (safetensors, tokenizers) report it only in their message."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "(os error 28)" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(e: OSError, path: Path | str) -> UserError | None:
    """A plain error for a write to `path` that failed for a reason the user can fix (a full disk,
    a folder without write permission), or None for anything else."""
    if e.errno in _NO_SPACE:
        return DiskFullError(path)
    if e.errno in _NOT_WRITABLE:
        return UserError(f"Cannot write {path}: {e.strerror or e}.",
                         hint="Choose a folder you can write to, or fix its permissions.")
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return UserError(f"Cannot write {path}: {e.strerror or e}.",
                         hint="A file stands where a folder is needed, or the other way round; choose another path.")
    return None

