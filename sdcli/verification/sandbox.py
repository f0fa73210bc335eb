"""Run untrusted Python code (a model's answer) in a separate, isolated process.

`run_python(code, limits)` runs `code` as `main.py` in a fresh folder and returns a
`SandboxResult`; the folder is gone afterwards. The child starts with `python -I` (no user site,
no PYTHON* variables) and runs sdcli/verification/sandbox_child.py first, which sets the limits
and the Python-level guard (sandbox_guard.py) and then runs main.py.

How strongly the code is isolated depends on the machine; `isolation()` says which level this
machine gets (`sd validate` prints it), and each result's `isolation` lists what took effect:

- `bubblewrap` (Linux, `bwrap` installed and allowed to create namespaces): the code runs in
  its own pid, network, mount, IPC and UTS namespaces. Its file system is built from nothing:
  the system folders (/usr and the /lib links) and the Python installation, read-only, and its
  own folder `/sandbox`, a tmpfs of `memory_mb` (also /tmp and HOME). Nothing else of the
  machine's files exists for it. As root, bubblewrap starts it as root with only CAP_SETUID and
  CAP_SETGID and the child switches to a fresh random uid, so it owns no file and RLIMIT_NPROC
  applies; as a normal user it runs as that user inside a user namespace, where RLIMIT_NPROC
  counts this sandbox's processes only. When the run ends, its pid namespace ends, and every
  process in it is killed, including any that started a new session.
- `process` (no usable bubblewrap, or not Linux): the process-level isolation alone. On Linux
  the child unshares pid and network namespaces where the kernel allows (inside a user
  namespace when not root), so a daemon it starts dies with it; as root it also switches to a
  fresh uid, and every process of that uid is killed at the end; as a normal user it runs as
  you. It sees the real file system, limited by file permissions and by the Python guard, which
  runs in strict mode here.

Both levels: a wall-clock limit (the parent kills the process group, and for bubblewrap the
namespace, when it runs out), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, no core files, stdout+stderr
capped at `output_bytes` (the child is killed past it), and the Python guard of
sandbox_guard.py unless `guards=False` (only to test what the kernel holds on its own).

This module chooses the level; each level's setup is sandbox_bubblewrap.py or
sandbox_process.py, and both start, watch and kill the child with sandbox_launch.py, which
returns a sandbox_result.SandboxResult.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdcli.core.errors import UserError
from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.sandbox_bubblewrap import bwrap, run_bubblewrap
from sdcli.verification.sandbox_process import run_process
from sdcli.verification.sandbox_result import SandboxResult

LEVELS = ("bubblewrap", "process")


@dataclass(frozen=True)
class Isolation:
    level: str  # bubblewrap | process
    as_root: bool
    why: str = ""  # why not bubblewrap, when level is "process"
    took_effect: tuple[str, ...] = ()  # what a probe run got (SandboxResult.isolation)

    def describe(self) -> str:
        """A few lines for `sd validate`: what holds on this machine, and what does not."""
        if self.level == "bubblewrap":
            who = "a fresh unprivileged uid" if self.as_root else "your uid inside a user namespace"
            return (
                f"bubblewrap: the code runs as {who}, in its own pid, network and mount namespaces. It sees "
                "the system and the Python installation read-only and none of your files, only its own "
                "folder; every process it starts is killed when the run ends."
            )
        if "pid_namespace" in self.took_effect:
            where = ", in its own pid and network namespaces"
        elif "network_namespace" in self.took_effect:
            where = ", in its own network namespace"
        else:
            where = ", with no namespaces (the machine allows none)"
        if self.as_root and "separate_uid" not in self.took_effect:
            what = (
                f"the code runs as root{where}, as no free uid range was found to switch to. Only the Python "
                "guard, which is not a security boundary, keeps it from the machine."
            )
        elif self.as_root:
            reads = (
                "every file (Python is installed where other users cannot read, so it keeps CAP_DAC_READ_SEARCH)"
                if "reads_all_files" in self.took_effect
                else "what every user may read"
            )
            what = (
                f"the code runs as a fresh unprivileged uid{where}. Without the Python guard it could read {reads} "
                "and write where every user may (/tmp, say); the guard refuses that, but it is not a security "
                "boundary."
            )
        else:
            what = (
                f"the code runs as you{where}. Only the Python guard, which is not a security boundary, keeps it "
                "from your files (the data with the expected answers among them) and your processes."
            )
        if sys.version_info >= (3, 13):  # PEP 667: frame.f_locals is writable, and writing it is not audited
            what += (" On this Python (3.13 or later) code that runs inside the guard (a signal handler, a "
                     "finalizer) can rewrite the guard's own variables; Python 3.12 or earlier keeps them out of reach.")
        return f"process level only ({self.why}): {what} Install bubblewrap for real isolation."


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    *,
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    guards: bool = True,
    stdin: bytes | None = None,
    pass_fds: Sequence[int] = (),
    preload: Sequence[str] = (),
    level: str | None = None,
) -> SandboxResult:
    """Run `code` as `main.py` in a fresh folder under `limits` (default: SandboxLimits()).

    Never raises for what the code does: every outcome is a SandboxResult.

    files: extra text files written next to main.py (plain names, no folders).
    args: sys.argv[1:] for the code.
    guards: install the Python-level guard (see sandbox_guard.py). Off only to test what the
        process-level limits hold on their own.
    stdin: bytes the child reads on stdin (then end of file); None: /dev/null.
    pass_fds: open file descriptors the child inherits under the same numbers. They belong to
        this call from now on: closed here once the child has started (or failed to).
    preload: modules the child imports before the guard (for a program that needs them).
    level: "bubblewrap" or "process" to choose the isolation (tests); default: `isolation()`.
    """
    limits = limits or SandboxLimits()
    try:
        if os.name != "posix":
            raise UserError(
                "The code sandbox needs Linux or macOS.",
                hint="Run `sd` under Linux (or WSL) to use signal.kind: feedback.",
            )
        files = {"main.py": code, **_checked(files or {})}
        chosen = level or isolation().level
        if chosen not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if chosen == "bubblewrap":
            return run_bubblewrap(files, limits, list(args), guards, stdin, tuple(pass_fds), tuple(preload))
        return run_process(files, limits, list(args), guards, stdin, tuple(pass_fds), tuple(preload))
    finally:
        for fd in pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _checked(files: Mapping[str, str]) -> dict[str, str]:
    for name in files:
        if Path(name).name != name or name in ("main.py", ".", ".."):
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
    return dict(files)


@functools.cache
def isolation() -> Isolation:
    """The level this machine gets: bubblewrap when `bwrap` runs Python in its namespaces here, else process."""
    as_root = sys.platform.startswith("linux") and os.geteuid() == 0
    why = _why_not_bubblewrap()
    if why is None:
        return Isolation("bubblewrap", as_root)
    probe = run_process({"main.py": "pass"}, SandboxLimits(wall_seconds=20), [], True, None, (), ())
    return Isolation("process", as_root, why, tuple(probe.isolation))


def _why_not_bubblewrap() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if bwrap() is None:
        return "bwrap is not installed"
    try:
        probe = run_bubblewrap({"main.py": "print('ok')"}, SandboxLimits(wall_seconds=20), [], True, None, (), ())
    except OSError as e:
        return f"bwrap failed: {e}"
    if probe.stdout != "ok\n":
        tail = " ".join((probe.stderr or probe.killed_reason or "no output").strip().splitlines()[-2:])
        return f"bwrap cannot run Python here: {tail}"
    return None
