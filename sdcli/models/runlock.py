"""One writer per run folder: an exclusive `flock` on `run_dir/.lock`.

Two `sd train` into one run folder at once would both number their episode 001, and a `--resume`
beside the still-running original would train twice into the same `.partial-*` folder. So every
command that writes into a run holds this lock for as long as it writes.

`flock` belongs to the open file, and the kernel drops it when the process exits, however it
exits: a lock left by `kill -9` is free at once, with no pid checks and no timeouts. The file
also carries the holder's pid, host, command and start time, only so that a refused command can
say who holds the run. On a clean release the file is emptied; details still in it when the
lock is taken mean the previous holder died, which is reported as a note and then overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from sdcli.core.errors import UserError
from sdcli.models.episodes import now_iso

LOCK_FILE = ".lock"

# run folders this process holds (resolved path -> depth), so that a command that already holds
# a run can call code that takes the same lock: flock on a second file handle would refuse us
_held: dict[Path, int] = {}


@contextlib.contextmanager
def run_lock(run_dir: Path | str, purpose: str, log=None) -> Iterator[None]:
    """Hold `run_dir` exclusively for the block; raise UserError naming the holder if it is taken.

    `purpose` says what the holder does ("sd train: episode 'facts'"), for the refusal message of
    the next command. `log(str)` gets the note when a lock left by a killed process is taken over.
    """
    run_dir = Path(run_dir)
    key = _prepare(run_dir)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _open(run_dir)
    try:
        _acquire(fd, run_dir)
        previous = _read_holder(fd)
        if previous and log:
            log(f"note: {run_dir}: the previous holder of this run ({_describe(previous)}) is no longer running "
                "(killed or crashed); taking the run over.")
        _write_holder(fd, purpose)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)  # emptied before the unlock: the next holder sees a clean release
    finally:
        os.close(fd)  # closing the last handle releases the flock


def _prepare(run_dir: Path) -> Path:
    """Create run_dir if needed; refuse a path that cannot be a writable folder. Returns its resolved path."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"run_dir {run_dir} is a file, not a folder.",
            hint="Choose another run_dir (e.g. run_dir=runs/mine on the command line), or move the file away.",
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(run_dir, e) from None
    return run_dir.resolve()


def _open(run_dir: Path) -> int:
    try:
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _unwritable(run_dir, e) from None


def _unwritable(run_dir: Path, e: OSError) -> UserError:
    reason = e.strerror or str(e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(
            f"run_dir {run_dir} is not writable ({reason}); sd writes its episodes there.",
            hint="Fix the folder's permissions, or choose another run_dir (e.g. run_dir=runs/mine).",
        )
    return UserError(f"Cannot use {run_dir} as run_dir: {reason}.", hint="Choose another run_dir (e.g. run_dir=runs/mine).")


def _acquire(fd: int, run_dir: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        who = _describe(holder) if holder else "another sd process, which is still starting"
        raise UserError(
            f"{run_dir} is in use by {who}. Only one sd command may write into a run at a time.",
            hint="Wait for it to finish, or stop it, then run again. Nothing was changed."
            + (f" (kill {holder['pid']} on {holder['host']})" if holder else ""),
        ) from None


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", errors="replace")
    try:
        holder = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "command": text.strip()[:200], "started": "?"}
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, purpose: str) -> None:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv),
              "purpose": purpose, "started": now_iso()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
    os.fsync(fd)


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"({holder.get('purpose') or 'sd'}; command: {holder.get('command', '?')}; "
            f"since {holder.get('started', '?')})")
