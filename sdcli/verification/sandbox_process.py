"""The process level, where bubblewrap is not usable: the child in a fresh folder of the real file
system, with only what the process can set up for itself (sandbox.py's docstring says what)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.sandbox_launch import child_config, child_env, execute, fresh_uid
from sdcli.verification.sandbox_result import SandboxResult

_PROCESS_NAMESPACES = True  # tests turn it off to see the process level where no namespace is allowed


def run_process(
    files: dict[str, str],
    limits: SandboxLimits,
    args: list[str],
    guards: bool,
    stdin: bytes | None,
    pass_fds: tuple[int, ...],
    preload: tuple[str, ...],
) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="sd-sandbox-"))
    try:
        for name, text in files.items():
            (workdir / name).write_text(text, encoding="utf-8")
        uid = fresh_uid()
        if uid is not None:
            for p in [workdir, *workdir.iterdir()]:
                os.chown(p, uid, uid)
        linux = sys.platform.startswith("linux")
        config = child_config(str(workdir), limits, args, guards, uid, preload)
        config.update(nproc=int(limits.max_processes), nproc_shared=None)
        if linux and os.geteuid() != 0:
            # The user's tasks are counted together: a ceiling of what runs now plus the budget
            # (the child narrows it to the budget where it gets a user namespace of its own).
            config.update(nproc_shared=_tasks_of(os.getuid()) + int(limits.max_processes))
        config.update(unshare_net=linux and _PROCESS_NAMESPACES, strict=True)
        return execute([], config, workdir, child_env(str(workdir)), limits, uid, stdin, pass_fds, [], bubblewrap=False)
    finally:
        _rmtree(workdir)


def _tasks_of(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    n += len(os.listdir("/proc/" + pid + "/task"))
            except OSError:
                pass
    return n


def _rmtree(path: Path) -> None:
    """Delete the folder even where the code made parts of it read-only."""

    def retry(func, p, _exc):  # same arguments for onerror (<= 3.11) and onexc
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
