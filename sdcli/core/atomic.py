"""Atomic publishing: a file or a folder appears whole at its path, or not at all.

Every writer of sd publishes through these: the result is written beside its final place under a
temporary name, then renamed into place (a rename within one folder is atomic). A reader, or a
crash, sees either the old content or the new, never half of it.

    write_atomic(path, data)   a file from bytes or text
    atomic_file(path)          a file written by someone else (safetensors, a library's writer)
    atomic_folder(path)        a folder that does not exist yet
    swap_folder(new, target, aside)
                               a finished folder replaces an existing one: two renames

Files are created as `open(path, "w")` would create them (mode 0o666 less the umask, applied by the
kernel), so nothing needs to read the process's umask.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sdcli.core.errors import write_error


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty file in path's folder, named `.NAME.<random>`, opened for writing."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the file at; when the block ends without an
    exception it replaces `path`, otherwise it is removed and `path` is left as it was. A full
    disk or a folder without write permission while starting is a UserError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(path)
    except OSError as e:
        raise write_error(e, path) or e from None
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a mix.

    A full disk or a folder without write permission is a UserError naming `path` (the old
    content, if any, is kept), not an OSError without a file name."""
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        problem = write_error(e, path)
        if problem is not None:
            raise problem from None
        raise


@contextlib.contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; when the block ends without an
    exception it is renamed to `path` (which must not exist then), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_folder(new: Path, target: Path, aside: Path) -> None:
    """Put the finished folder `new` at `target`. An existing `target` (a folder, a file or a
    link) is first renamed to `aside`, then removed once `new` is in place; a process killed
    between the two renames leaves the previous content at `aside`, never nothing at all."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    os.replace(target, aside)
    os.replace(new, target)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()
