"""Run untrusted Python code (a model's answer) in a separate, isolated process.

`run_python(code, limits)` runs `code` as `main.py` in a fresh folder and returns a
`SandboxResult`; the folder is gone afterwards. The child starts with `python -I` (no user site,
no PYTHON* variables) and runs sdcli/verification/sandbox_child.py first, which sets the limits
and the Python-level guard and then runs main.py.

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
sandbox_child.py unless `guards=False` (only to test what the kernel holds on its own).
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
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.core.errors import UserError
from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification import sandbox_child

TRUNCATED = "\n[... output truncated: the sandbox keeps at most {n} bytes ...]\n"
INSIDE = "/sandbox"  # the folder's path inside bubblewrap
LEVELS = ("bubblewrap", "process")
_PROCESS_NAMESPACES = True  # tests turn it off to see the process level where no namespace is allowed


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock limit was reached
    killed_reason: str | None  # wall_time | cpu_time | memory | output_limit | signal:NAME | None
    duration: float  # seconds, wall clock
    # What took effect, e.g. ["bubblewrap", "pid_namespace", "separate_uid", "process_count", ...],
    # and which isolation steps were tried and failed, and why.
    isolation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


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
    guards: install the Python-level guard (see sandbox_child.py). Off only to test what the
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
            return _run_bubblewrap(files, limits, list(args), guards, stdin, tuple(pass_fds), tuple(preload))
        return _run_process(files, limits, list(args), guards, stdin, tuple(pass_fds), tuple(preload))
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
    probe = _run_process({"main.py": "pass"}, SandboxLimits(wall_seconds=20), [], True, None, (), ())
    return Isolation("process", as_root, why, tuple(probe.isolation))


def _why_not_bubblewrap() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if _bwrap() is None:
        return "bwrap is not installed"
    try:
        probe = _run_bubblewrap({"main.py": "print('ok')"}, SandboxLimits(wall_seconds=20), [], True, None, (), ())
    except OSError as e:
        return f"bwrap failed: {e}"
    if probe.stdout != "ok\n":
        tail = " ".join((probe.stderr or probe.killed_reason or "no output").strip().splitlines()[-2:])
        return f"bwrap cannot run Python here: {tail}"
    return None


def _bwrap() -> str | None:
    return shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:" + os.environ.get("PATH", ""))


# ---------------------------------------------------------------------------------------------
# The two levels


def _run_bubblewrap(
    files: dict[str, str],
    limits: SandboxLimits,
    args: list[str],
    guards: bool,
    stdin: bytes | None,
    pass_fds: tuple[int, ...],
    preload: tuple[str, ...],
) -> SandboxResult:
    as_root = os.geteuid() == 0
    uid = _fresh_uid() if as_root else None
    if as_root and uid is None:
        raise OSError("no free uid range to run the code under")
    size = int(limits.memory_mb) << 20
    argv = [
        _bwrap() or "bwrap",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",  # the sandbox dies with this process, whatever happens to it
        "--new-session",
        "--hostname",
        "sandbox",
    ]
    if as_root:
        # Privileged bubblewrap: no user namespace, so the child can become a real, fresh uid
        # (RLIMIT_NPROC then counts; a user namespace would map it to root outside).
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += _system_binds()
    argv += ["--proc", "/proc", *_minimal_dev()]
    argv += ["--perms", "1777", "--size", str(size), "--tmpfs", "/dev/shm"]
    argv += ["--perms", "1777", "--size", str(size), "--tmpfs", INSIDE]
    file_fds = []
    try:
        for name, text in files.items():
            file_fds.append(_memfd(name, text))
            argv += ["--perms", "0644", "--file", str(file_fds[-1]), f"{INSIDE}/{name}"]
        if not any(d == "/tmp" or d.startswith("/tmp/") for d in _python_dirs()):  # else /tmp holds Python, read-only
            argv += ["--symlink", INSIDE, "/tmp"]
        argv += ["--chdir", INSIDE, "--remount-ro", "/", "--"]
        config = _child_config(INSIDE, limits, args, guards, uid, preload)
        config.update(nproc=int(limits.max_processes), nproc_shared=None, unshare_net=False, strict=False)
        env = _env(INSIDE)
        with_bwrap = ["bubblewrap", "pid_namespace", "network_namespace", "mount_namespace", "read_only_system"]
        fds = (*pass_fds, *file_fds)
        return _execute(argv, config, None, env, limits, uid, stdin, fds, with_bwrap, bubblewrap=True)
    finally:
        for fd in file_fds:
            os.close(fd)


def _minimal_dev() -> list[str]:
    """A /dev with the usual character devices that exist here, and the fd links.

    Not bwrap's own `--dev`: it fails outright when the host lacks one of its devices (containers
    without /dev/full are common), which would leave such machines at the process level.
    """
    argv = ["--tmpfs", "/dev"]
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists(f"/dev/{name}"):
            argv += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    argv += ["--symlink", "/proc/self/fd", "/dev/fd"]
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        argv += ["--symlink", f"/proc/self/fd/{fd}", f"/dev/{name}"]
    return argv


def _run_process(
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
        uid = _fresh_uid()
        if uid is not None:
            for p in [workdir, *workdir.iterdir()]:
                os.chown(p, uid, uid)
        linux = sys.platform.startswith("linux")
        config = _child_config(str(workdir), limits, args, guards, uid, preload)
        config.update(nproc=int(limits.max_processes), nproc_shared=None)
        if linux and os.geteuid() != 0:
            # The user's tasks are counted together: a ceiling of what runs now plus the budget
            # (the child narrows it to the budget where it gets a user namespace of its own).
            config.update(nproc_shared=_tasks_of(os.getuid()) + int(limits.max_processes))
        config.update(unshare_net=linux and _PROCESS_NAMESPACES, strict=True)
        return _execute([], config, workdir, _env(str(workdir)), limits, uid, stdin, pass_fds, [], bubblewrap=False)
    finally:
        _rmtree(workdir)


def _child_config(
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


def _env(home: str) -> dict[str, str]:
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


def _system_binds() -> list[str]:
    """bubblewrap arguments for a read-only system: /usr, the /bin and /lib links, the loader's
    files in /etc, and the Python installation (which may lie elsewhere, e.g. under a home folder)."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    # Folders bubblewrap creates on the way to a mount point are 0700 when it runs as root:
    # create them 0755 first, so the child's uid can pass through.
    argv += ["--perms", "0755", "--dir", "/etc"]
    for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives"):
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    made: set[str] = set()
    for path in _python_dirs():
        for parent in reversed(Path(path).parents[:-1]):  # outermost first, without "/"
            if str(parent) not in made:
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", path, path]
    return argv


def _python_dirs() -> list[str]:
    """The Python installation's folders outside /usr, outermost first, none inside another."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates |= {str(Path(sys.executable).parent.parent), str(Path(sys.executable).resolve().parent.parent)}
    paths = sorted({os.path.normpath(p) for p in candidates if p}, key=len)
    kept: list[str] = []
    for p in paths:
        if p in ("/", "/usr") or p.startswith("/usr/") or any(p.startswith(k + "/") for k in kept):
            continue
        kept.append(p)
    return kept


def _memfd(name: str, text: str) -> int:
    """A file descriptor holding `text`, for bubblewrap's --file (which copies it into the tmpfs)."""
    fd = os.memfd_create(f"sd-{name}")  # close-on-exec; Popen's pass_fds hands it to bubblewrap alone
    data = text.encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ---------------------------------------------------------------------------------------------
# Starting, watching and killing the child


def _execute(
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
    command = [*prefix, sys.executable, "-I", "-c", sandbox_child.LAUNCH, _child_source(), json.dumps(config)]
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
        done, notes = _read_status(status_r)
    if bubblewrap and returncode is not None and 128 < returncode <= 128 + 64:
        returncode = -(returncode - 128)  # bubblewrap reports a child killed by signal N as 128 + N
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
        isolation=[*isolation, *done],
        notes=notes,
    )


@functools.cache
def _child_source() -> str:
    return Path(sandbox_child.__file__).read_text(encoding="utf-8")


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
    import pwd

    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    while True:
        uid = lo + secrets.randbelow(hi - lo)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


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
