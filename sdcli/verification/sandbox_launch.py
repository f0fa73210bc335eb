"""Starting the sandboxed child, watching it and killing it: what both isolation levels share.

`execute` runs `python -I -c LAUNCH <sandbox_child.py> <sandbox_guard.py> CONFIG` (the two as
source text) after a level's command prefix (bubblewrap's, or none), reads its output within
the limits, kills every process of it at the end and returns the SandboxResult. `child_config`
and `child_env` are what the child is given; `fresh_uid` is the uid it becomes when we are root.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification import sandbox_child, sandbox_guard
from sdcli.verification.sandbox_result import SandboxResult, decode_output, diagnose, read_status


def child_config(
    root: str, limits: SandboxLimits, args: list[str], guards: bool, uid: int | None, preload: tuple[str, ...]
) -> dict:
    return {
        "root": root,
        "argv": args,
        "uid": uid,
        "cpu": int(limits.cpu_seconds),
        "memory": int(limits.memory_mb) << 20,
        # A file may be as large as the memory budget: enough for any honest program, and a
        # `while True: f.write(...)` stops there instead of filling the disk.
        "file_size": int(limits.memory_mb) << 20,
        "guards": guards,
        "preload": list(preload),
    }


def child_env(home: str) -> dict[str, str]:
    return {
        "HOME": home,
        "TMPDIR": home,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Thread pools count against the process limit (RLIMIT_NPROC counts threads): keep them at one.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def fresh_uid() -> int | None:
    """A random unused uid for the child when we are root on Linux (None otherwise).

    The uid must be mapped in our user namespace (containers often map only part of the range).
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    try:
        ranges = [tuple(map(int, line.split())) for line in Path("/proc/self/uid_map").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    spans = []
    for inside, _, count in ranges:
        lo, hi = max(inside, 100_000), min(inside + count, 2**31 - 2)
        if hi - lo >= 1000:
            spans.append((lo, hi))
    if not spans:
        return None
    import pwd

    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    while True:
        uid = lo + secrets.randbelow(hi - lo)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


def execute(
    prefix: list[str],
    config: dict,
    cwd: Path | None,
    env: dict[str, str],
    limits: SandboxLimits,
    uid: int | None,
    stdin: bytes | None,
    pass_fds: tuple[int, ...],
    isolation: list[str],
    *,
    bubblewrap: bool,
) -> SandboxResult:
    status_r, status_w = os.pipe()
    config["status_fd"] = status_w
    command = [*prefix, sys.executable, "-I", "-c", sandbox_child.LAUNCH, *_child_sources(), json.dumps(config)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so one killpg reaches every child
            pass_fds=(status_w, *pass_fds),
        )
    finally:
        os.close(status_w)
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()

    def kill() -> None:  # cheap (a few ms), so called again at the end to catch any racing fork
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)

    try:
        out, err, reason = _collect(proc, limits, start, kill)
    finally:
        kill()  # before reaping, while the group id cannot have been reused
        returncode, cpu_used = _reap(proc)
        proc.stdout.close()
        proc.stderr.close()
        done, notes = read_status(status_r)
    if bubblewrap and returncode is not None and 128 < returncode <= 128 + 64:
        returncode = -(returncode - 128)  # bubblewrap reports a child killed by signal N as 128 + N
    duration = time.monotonic() - start
    if reason is None:
        reason = diagnose(returncode, cpu_used, err, limits)
    return SandboxResult(
        returncode=returncode,
        stdout=out,
        stderr=err,
        timed_out=reason == "wall_time",
        killed_reason=reason,
        duration=duration,
        isolation=[*isolation, *done],
        notes=notes,
    )


@functools.cache
def _child_sources() -> tuple[str, str]:
    """The source text of sandbox_child.py and of the guard it installs, sandbox_guard.py."""
    return tuple(Path(module.__file__).read_text(encoding="utf-8") for module in (sandbox_child, sandbox_guard))


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, ValueError, OSError):
        pass  # the child stopped reading; its result says why
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _collect(proc: subprocess.Popen, limits: SandboxLimits, start: float, kill) -> tuple[str, str, str | None]:
    """Read stdout/stderr until the child has exited and both pipes are closed.

    Calls `kill()` (every process of the child) on the wall-clock limit, once the output passes its
    cap, and when the main process exits (so background children cannot hold the pipes). Returns
    (stdout, stderr, reason) where reason is "wall_time", "output_limit" or None; a stream that
    was cut ends with the TRUNCATED marker.
    """
    out, err = bytearray(), bytearray()
    buffers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    deadline = start + limits.wall_seconds
    reason: str | None = None
    exited = False
    overflowed: set[int] = set()
    drain_until: float | None = None  # after a kill or the exit, read what is left, briefly

    def stop(why: str | None) -> None:
        nonlocal reason, drain_until
        if why is not None and reason is None:
            reason = why
        if drain_until is None:
            kill()
            drain_until = time.monotonic() + 1.0

    try:
        while True:
            now = time.monotonic()
            if not exited and _exited(proc.pid):
                exited = True
                stop(None)  # children left in the background would keep the pipes open
            if exited and not sel.get_map():
                break
            if drain_until is not None and now > drain_until:
                break  # something we cannot kill still holds a pipe; stop waiting for it
            if reason is None and now >= deadline:
                stop("wall_time")
            if not sel.get_map():
                time.sleep(0.02)  # pipes closed early; wait for the exit (or the deadline)
                continue
            for key, _ in sel.select(timeout=0.05):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = max(limits.output_bytes - len(out) - len(err), 0)
                buffers[key.fd] += chunk[:room]
                if len(chunk) > room:
                    overflowed.add(key.fd)
                    stop("output_limit")
    finally:
        sel.close()
    return (
        decode_output(out, limits.output_bytes, proc.stdout.fileno() in overflowed),
        decode_output(err, limits.output_bytes, proc.stderr.fileno() in overflowed),
        reason,
    )


def _exited(pid: int) -> bool:
    """Has the child exited? (Looks without reaping, so its pid cannot be reused under us.)"""
    if not hasattr(os, "waitid"):  # some platforms lack it: a zombie still shows up as a process
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            return False  # no /proc: rely on the pipes closing and on the deadline
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for the child; return (returncode as subprocess gives it, CPU seconds it used)."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere; unusual, keep going
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process of the child's uid, including any that left the process group (setsid).

    `kill -9 -1` run as that uid reaches all of its processes; Linux never delivers it to the
    caller itself. /bin/kill rather than Python because the interpreter may be unreadable for
    that uid.
    """
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill is None:
        return
    try:
        subprocess.run(
            [kill, "-9", "--", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        pass
