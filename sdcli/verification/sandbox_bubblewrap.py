"""The bubblewrap level: the `bwrap` command line that builds the child's file system from nothing.

What it isolates is in sandbox.py's docstring; this module turns it into bubblewrap's arguments
and runs the child behind them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.sandbox_launch import child_config, child_env, execute, fresh_uid
from sdcli.verification.sandbox_result import SandboxResult

INSIDE = "/sandbox"  # the folder's path inside bubblewrap


def bwrap() -> str | None:
    return shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin:" + os.environ.get("PATH", ""))


def run_bubblewrap(
    files: dict[str, str],
    limits: SandboxLimits,
    args: list[str],
    guards: bool,
    stdin: bytes | None,
    pass_fds: tuple[int, ...],
    preload: tuple[str, ...],
) -> SandboxResult:
    as_root = os.geteuid() == 0
    uid = fresh_uid() if as_root else None
    if as_root and uid is None:
        raise OSError("no free uid range to run the code under")
    size = int(limits.memory_mb) << 20
    argv = [
        bwrap() or "bwrap",
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
        config = child_config(INSIDE, limits, args, guards, uid, preload)
        config.update(nproc=int(limits.max_processes), nproc_shared=None, unshare_net=False, strict=False)
        env = child_env(INSIDE)
        with_bwrap = ["bubblewrap", "pid_namespace", "network_namespace", "mount_namespace", "read_only_system"]
        fds = (*pass_fds, *file_fds)
        return execute(argv, config, None, env, limits, uid, stdin, fds, with_bwrap, bubblewrap=True)
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
