"""Run untrusted Python code (a model's answer) in a separate, limited process.

`run_python(code, limits)` writes `code` to `main.py` in a fresh temporary folder, runs it with
`python -I` (isolated mode: no user site, no PYTHON* variables, no current folder on sys.path)
in a new session, and returns a `SandboxResult`. The folder is deleted afterwards.

What holds at the process level (the kernel enforces it; code cannot undo it):

- wall-clock limit: the parent kills the child's whole process group when it runs out;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core files;
- output: stdout and stderr are read in chunks and the child is killed once together they pass
  `output_bytes`, so a huge print never reaches the parent's memory;
- Linux, started as root (as in a typical container): the child unshares a network namespace (it has only a
  loopback device that is down, so nothing is reachable, not even the parent's 127.0.0.1), then
  switches to a fresh random uid, drops every capability except CAP_DAC_READ_SEARCH (kept only
  when the Python install is unreadable to other users, e.g. under /root; it lets the child *read*
  any file, which root could anyway, so this is still strictly less than root) and sets
  no_new_privs. Because the uid is not root, RLIMIT_NPROC now counts and stops
  fork bombs (it is ignored for root); the child cannot write files it does not own (it can still
  write to world-writable places such as /tmp); and afterwards every process of that uid is killed,
  even one that left the process group.
- Linux, not root: the child tries an unprivileged user+network namespace for the network, and
  RLIMIT_NPROC is set to the user's current task count plus `max_processes` (the count is shared
  with the user's other processes, so this is a ceiling, not an exact budget).

What is only a Python-level guard (on by default, `guards=False` turns it off for tests): an audit
hook (`sys.addaudithook`, which code cannot remove) refuses process creation, sockets, ctypes,
signals to other processes, raising resource limits, and file writes, renames and deletions
outside the temporary folder. Determined hostile code can get around a Python-level guard (for
example through a C extension); it is there to stop accidents and to turn them into a clear
PermissionError, not as a security boundary. On macOS and elsewhere only the rlimits (where the
platform honours them), the process group and the Python guard apply.

`SandboxResult.isolation` lists what actually took effect in that run, so a caller can report it.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.config import SandboxLimits
from sdcli.errors import UserError

TRUNCATED = "\n[... output truncated: the sandbox keeps at most {n} bytes ...]\n"


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock limit was reached
    killed_reason: str | None  # wall_time | cpu_time | memory | output_limit | signal:NAME | None
    duration: float  # seconds, wall clock
    # What took effect, e.g. ["network_namespace", "separate_uid", "process_count", ...], and which
    # isolation steps were tried and failed, and why.
    isolation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    *,
    files: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    guards: bool = True,
) -> SandboxResult:
    """Run `code` as `main.py` in a fresh folder under `limits` (default: SandboxLimits()).

    Never raises for what the code does: every outcome is a SandboxResult.

    files: extra text files written next to main.py (plain names, no folders).
    args: sys.argv[1:] for the code.
    guards: install the Python-level guard (see the module docstring). Off only to test what the
        process-level limits hold on their own.
    """
    limits = limits or SandboxLimits()
    if os.name != "posix":
        raise UserError(
            "The code sandbox needs Linux or macOS.", hint="Run `sd` under Linux (or WSL) to use signal.kind: feedback."
        )
    workdir = Path(tempfile.mkdtemp(prefix="sd-sandbox-"))
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8")
        for name, text in (files or {}).items():
            if Path(name).name != name or name in ("main.py", ".", ".."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            (workdir / name).write_text(text, encoding="utf-8")
        uid = _fresh_uid()
        if uid is not None:
            for p in [workdir, *workdir.iterdir()]:
                os.chown(p, uid, uid)
        return _run(workdir, limits, list(args), guards, uid)
    finally:
        _rmtree(workdir)


def _run(workdir: Path, limits: SandboxLimits, args: list[str], guards: bool, uid: int | None) -> SandboxResult:
    status_r, status_w = os.pipe()
    config = {
        "root": str(workdir),
        "argv": args,
        "uid": uid,
        "cpu": int(limits.cpu_seconds),
        "memory": int(limits.memory_mb) << 20,
        # A file may be as large as the memory budget: enough for any honest program, and a
        # `while True: f.write(...)` stops there instead of filling the disk.
        "file_size": int(limits.memory_mb) << 20,
        "processes": int(limits.max_processes),
        "guards": guards,
        "status_fd": status_w,
    }
    env = {
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Thread pools count against the process limit (RLIMIT_NPROC counts threads): keep them at one.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(config)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so one killpg reaches every child
            pass_fds=(status_w,),
        )
    finally:
        os.close(status_w)

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
        isolation, notes = _read_status(status_r)
    duration = time.monotonic() - start
    if reason is None:
        reason = _diagnose(returncode, cpu_used, err, limits)
    return SandboxResult(
        returncode=returncode,
        stdout=out,
        stderr=err,
        timed_out=reason == "wall_time",
        killed_reason=reason,
        duration=duration,
        isolation=isolation,
        notes=notes,
    )


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
        _decode(out, limits.output_bytes, proc.stdout.fileno() in overflowed),
        _decode(err, limits.output_bytes, proc.stderr.fileno() in overflowed),
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


def _fresh_uid() -> int | None:
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
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return lo + secrets.randbelow(hi - lo)


def _read_status(fd: int) -> tuple[list[str], list[str]]:
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 1 << 16)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    try:
        status = json.loads(data.decode())
        return list(status["isolation"]), list(status["notes"])
    except (ValueError, KeyError, TypeError):
        return [], ["the child did not report its isolation (it failed before setting it up)"]


def _decode(data: bytearray, cap: int, truncated: bool) -> str:
    text = data.decode("utf-8", errors="replace")
    return text + TRUNCATED.format(n=cap) if truncated else text


def _diagnose(returncode: int, cpu_used: float | None, stderr: str, limits: SandboxLimits) -> str | None:
    """Why the child ended, when a limit ended it (the wall-clock and output limits are known already)."""
    if returncode == -signal.SIGXCPU:
        return "cpu_time"
    if returncode == -signal.SIGKILL and cpu_used is not None and cpu_used >= limits.cpu_seconds:
        return "cpu_time"  # the hard limit (one second past the soft one) sends SIGKILL
    if returncode != 0 and "MemoryError" in stderr[-4000:]:
        return "memory"
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    return None


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


# ---------------------------------------------------------------------------------------------
# The child. Runs as `python -I -c _BOOTSTRAP CONFIG_JSON` in the temporary folder. It sets up
# isolation while it still has the privileges to (namespace, limits, uid), reports what took
# effect on the status pipe, installs the Python-level guard and then runs main.py. Kept free of
# imports from sdcli: the child has no access to the package.

_BOOTSTRAP = r"""
import json, os, resource, sys, traceback, types
C = json.loads(sys.argv[1])
sys.dont_write_bytecode = True  # no __pycache__ writes outside the folder
done, notes = [], []
linux = sys.platform.startswith("linux")
libc = None
if linux:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000

def _fail(what):
    err = ctypes.get_errno() if libc is not None else 0
    notes.append(f"{what}: {os.strerror(err) if err else 'failed'}")

def _limit(name, soft, hard=None):
    try:
        resource.setrlimit(getattr(resource, name), (soft, soft if hard is None else hard))
        return True
    except (ValueError, OSError, AttributeError) as e:
        notes.append(f"{name}: {e}")
        return False

def _tasks_of(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    n += len(os.listdir("/proc/" + pid + "/task"))
            except OSError:
                pass
    return n

# 0. Not root: the user's tasks are counted together, so the ceiling is what runs now plus the
# budget. Set before the user namespace below, which then enforces it on the real user as well
# (inside the namespace every outside process looks like uid 65534 and could not be counted).
if linux and os.geteuid() != 0:
    if _limit("RLIMIT_NPROC", _tasks_of(os.getuid()) - 1 + C["processes"]):
        done.append("process_count_shared_with_user")

# 1. Network: a new, empty network namespace (as root; otherwise inside a new user namespace).
if linux:
    flags = CLONE_NEWNET if os.geteuid() == 0 else (CLONE_NEWNET | CLONE_NEWUSER)
    if libc.unshare(flags) == 0:
        done.append("network_namespace")
    else:
        _fail("network namespace")

# 2. Resource limits. SIGXCPU at the soft CPU limit, SIGKILL one second later.
_limit("RLIMIT_CORE", 0)
if _limit("RLIMIT_CPU", C["cpu"], C["cpu"] + 1):
    done.append("cpu_time")
if _limit("RLIMIT_AS", C["memory"]):
    done.append("memory")
if _limit("RLIMIT_FSIZE", C["file_size"]):
    done.append("file_size")

# 3. A uid of its own (root only): makes RLIMIT_NPROC count and file permissions apply.
uid = C["uid"]
if linux and uid is not None and os.geteuid() == 0:
    class _Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class _Caps(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    # Folders the interpreter imports from, listed while we can still see them all.
    stdlib = os.path.dirname(os.__file__)
    needed = [p for p in (stdlib, os.path.join(stdlib, "lib-dynload")) if os.path.isdir(p)]
    try:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep permitted caps across setresuid
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        # access() checks the real uid without capabilities: can this uid read them on its own?
        readable = all(os.access(p, os.R_OK | os.X_OK) for p in needed)
        keep = 0 if readable else (1 << 2)  # CAP_DAC_READ_SEARCH
        caps = (_Caps * 2)()
        caps[0].effective = caps[0].permitted = keep
        if libc.capset(ctypes.byref(_Hdr(0x20080522, 0)), caps) != 0:  # _LINUX_CAPABILITY_VERSION_3
            _fail("capset")
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid binaries
            _fail("no_new_privs")
        done.append("separate_uid")
        if keep:
            done.append("reads_all_files")
    except OSError as e:
        notes.append(f"separate uid: {e}")
# RLIMIT_NPROC counts every task (threads too) of the real uid, and never applies to root.
if "separate_uid" in done:
    if _limit("RLIMIT_NPROC", C["processes"]):
        done.append("process_count")
elif "process_count_shared_with_user" not in done:
    notes.append("process count: no kernel limit here (root without a separate uid, or not Linux)")

try:
    os.write(C["status_fd"], json.dumps({"isolation": done, "notes": notes}).encode())
finally:
    os.close(C["status_fd"])

# 4. The Python-level guard.
def _install_guard(root):
    import builtins, _posixsubprocess
    root = os.path.realpath(root)
    blocked_prefixes = ("socket.", "ctypes.")
    blocked = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "subprocess.Popen", "os.killpg", "resource.setrlimit", "resource.prlimit", "pty.spawn"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                   "os.chown": (0,), "os.rename": (0, 1), "os.link": (1,), "os.symlink": (1,),
                   "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,)}
    realpath, fspath, getpid = os.path.realpath, os.fspath, os.getpid
    sep = os.sep
    PE = PermissionError

    def inside(p):
        if isinstance(p, int):
            return True  # an already-open file descriptor
        try:
            p = realpath(fspath(p))
        except Exception:
            return False
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        return p == root or p.startswith(root + sep) or p == "/dev/null"

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PE(f"sandbox: writing outside the working folder is not allowed: {path!r}")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    raise PE(f"sandbox: {event} outside the working folder is not allowed: {args[i]!r}")
        elif event in blocked or event.startswith(blocked_prefixes):
            raise PE(f"sandbox: {event} is not allowed (no processes, network or native calls)")
        elif event == "os.kill" and args[0] != getpid():
            raise PE("sandbox: signalling other processes is not allowed")

    def refuse(*a, **k):
        raise PE("sandbox: creating processes or sessions is not allowed")

    for name in ("setsid", "setpgid", "setpgrp", "fork", "forkpty"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    _posixsubprocess.fork_exec = refuse
    sys.addaudithook(hook)

if C["guards"]:
    _install_guard(C["root"])

# 5. Run main.py as __main__, with tracebacks that start in main.py.
libc = ctypes = None
sys.argv = ["main.py", *C["argv"]]
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
sys.modules["__main__"] = _main
try:
    with open("main.py", encoding="utf-8") as _f:
        _code = compile(_f.read(), "main.py", "exec")
    exec(_code, _main.__dict__)
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""
