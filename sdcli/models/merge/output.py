"""Writing the merged folder: a temporary sibling of the output, renamed into place once checked,
and the removal of the ones killed merges left behind.

The result is written to a temporary sibling of `out_dir`, `.NAME.partial-PID-XXXX`, and renamed
into place only after the check passes; on any failure nothing is left at `out_dir`. The merge
holds an flock on a file inside its temporary folder while it works. A merge killed with `kill -9`
(or by the OOM killer) cannot remove its folder, which is as large as the model, so the next merge
into the same parent folder removes every such folder whose owner has gone (its lock is free, or
its pid is dead), and says so (`remove_stale_partials`).
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from sdcli.core.atomic import swap_folder
from sdcli.core.errors import UserError, write_error

META_FILE = "sd_merge.json"
PARTIAL, REPLACED = ".partial-", ".replaced-"
OWNER_FILE = ".sd-merge-owner"
LEGACY_STALE_SECONDS = 3600


def partial_folder(out_dir: Path) -> Path:
    """A new, empty temporary sibling of `out_dir` to write the merge into (`.NAME.partial-PID-XXXX`)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{PARTIAL}{os.getpid()}-", dir=out_dir.parent))
    except OSError as e:
        raise write_error(e, out_dir) or e from None


def hold(tmp: Path) -> int:
    """Lock `tmp` as this merge's: an flock on a file inside it, released by the kernel however the
    process ends, so that a later merge can tell a live merge's folder from a dead one's."""
    fd = os.open(tmp / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _owner_alive(folder: Path) -> bool:
    """Whether the merge that made `folder` (a partial or replaced sibling of an output) still runs."""
    lock = folder / OWNER_FILE
    if lock.is_file():
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return True  # cannot tell: leave it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    match = re.match(r"^\.(?:.*)\.(?:partial|replaced)-(\d+)-", folder.name)
    if match:  # no lock file (killed before it was made, or a folder being replaced): the pid decides
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # made by an sd that put no pid in the name: stale once nothing has touched it for a while
    try:
        return time.time() - folder.stat().st_mtime < LEGACY_STALE_SECONDS
    except OSError:
        return True


def remove_stale_partials(out_dir: Path | str) -> list[str]:
    """Remove the temporary folders that killed merges left beside `out_dir`; one line each.

    Folders of merges into `out_dir` itself (`.NAME.partial-*`, `.NAME.replaced-*`) go when their
    owner has gone; those of merges into other outputs in the same folder only when they hold a
    merge's lock file that nobody holds (a folder of that shape without one may be someone else's).
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    ours = {*parent.glob(f".{glob.escape(out_dir.name)}{PARTIAL}*"), *parent.glob(f".{glob.escape(out_dir.name)}{REPLACED}*")}
    others = {p for p in parent.glob(f".*{PARTIAL}*") if (p / OWNER_FILE).is_file()} - ours
    lines = []
    for folder in sorted(ours | others):
        if not folder.is_dir() or folder.is_symlink() or _owner_alive(folder):
            continue
        if REPLACED in folder.name and not out_dir.exists() and not out_dir.is_symlink():
            # killed between the two renames of `publish`: this is the previous output, the only copy
            lines.append(f"kept {folder}: it holds the previous {out_dir}, from a merge killed while replacing it; "
                         f"move it back (mv {folder} {out_dir}) or delete it")
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            lines.append(f"removed {folder}, {size / 2**20:.1f} MB left by a merge that was killed")
    return lines


def publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Move the checked result into place; an existing out_dir (force) is swapped out, then removed."""
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise UserError(f"{out_dir} appeared while merging; not overwriting it.", hint="Pass --force to replace it.")
    swap_folder(tmp, out_dir, aside=tmp.with_name(tmp.name.replace(PARTIAL, REPLACED)))
