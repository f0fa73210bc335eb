"""Output paths, checked before long work starts.

`sd eval --out`, `sd merge --out`, `sd report --out`, `sd inspect --html` and a recipe's `run_dir`
are checked when the command starts, so that a file standing where a folder must go (or a folder
where a file must go, or a folder without write permission) is refused at once, not after an hour
of evaluation whose results would then be lost. Nothing is written here.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdcli.core.errors import UserError


def folder_problem(folder: Path | str) -> str | None:
    """Why `folder` (which may not exist yet) cannot be created or written into, or None.
    Looks at `folder` or, when it does not exist, the nearest existing folder above it."""
    folder = Path(folder)
    probe = folder
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        return f"{probe} is a broken symbolic link"
    if not probe.is_dir():
        if probe == folder:
            return f"{folder} is a file, not a folder"
        return f"{probe} is a file, so {folder} cannot be made under it"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def file_problem(path: Path | str) -> str | None:
    """Why `path` cannot be written as a file, or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; give a file name, e.g. {path / 'results.json'}"
    return folder_problem(path.parent)


def check_output_file(path: Path | str, option: str) -> None:
    """Raise UserError when `option` (e.g. "--out") names a path that cannot be written as a file."""
    problem = file_problem(path)
    if problem:
        raise UserError(f"{option} {path}: {problem}.", hint="Nothing was done; choose another path.")


def check_output_folder(path: Path | str, option: str) -> None:
    """Raise UserError when `option` names a path that cannot be a writable folder."""
    problem = folder_problem(path)
    if problem:
        raise UserError(f"{option} {path}: {problem}.", hint="Nothing was done; choose another path.")
