"""The sandbox's child side: what runs inside the sandboxed process, before the untrusted code.

sdcli/verification/sandbox_launch.py starts it as
`python -I -c LAUNCH <this file's source> <sandbox_guard.py's source> CONFIG_JSON` in the run's
folder, directly or inside bubblewrap. It imports nothing from sdcli, so it works where the
package itself cannot be read; the guard comes as source text for the same reason. In order, it:

1. sets up what only the process itself can: resource limits and the process count; when there
   is no bubblewrap, also pid and network namespaces where the kernel allows them (in a user
   namespace when not root), and, as root, a fresh uid without capabilities;
2. reports what took effect to the parent, on the status pipe;
3. installs the Python-level guard (sandbox_guard.py, which says what it refuses);
4. runs main.py as __main__, with tracebacks that start in main.py.
"""

import json
import os
import resource
import signal
import sys
import traceback
import types

CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000
FILENAME = "<sandbox>"  # this file's and the guard's name in tracebacks (both are compiled under it)
LAUNCH = "import sys; exec(compile(sys.argv.pop(1), '<sandbox>', 'exec'))"  # python -I -c LAUNCH SOURCE GUARD CONFIG


def main() -> None:
    guard_source = sys.argv.pop(1)  # sandbox_guard.py
    config = json.loads(sys.argv[1])
    sys.dont_write_bytecode = True  # no __pycache__ writes outside the folder
    done, notes = setup_isolation(config)
    try:
        os.write(config["status_fd"], json.dumps({"isolation": done, "notes": notes}).encode())
    finally:
        os.close(config["status_fd"])
    for name in config.get("preload", ()):
        __import__(name)  # while bytecode may still be loaded; strict mode refuses it later
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
        del sys.modules[name]  # used above; with the guard, importing it again is refused
    if config["guards"]:
        install_guard = load_guard(guard_source)
        install_guard(config["root"], strict=config["strict"])
    run_main(config["argv"])


# ---------------------------------------------------------------------------------------------
# 1. Isolation the process sets up for itself


def setup_isolation(c: dict) -> tuple[list[str], list[str]]:
    """Apply limits, namespace and uid from the config; return (what took effect, what failed and why)."""
    done: list[str] = []
    notes: list[str] = []
    linux = sys.platform.startswith("linux")
    libc = None
    if linux and (c["unshare_net"] or c["uid"] is not None):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)

    def failed(what: str) -> None:
        import ctypes

        err = ctypes.get_errno()
        notes.append(f"{what}: {os.strerror(err) if err else 'failed'}")

    def limit(name: str, soft: int, hard: int | None = None) -> bool:
        try:
            resource.setrlimit(getattr(resource, name), (soft, soft if hard is None else hard))
            return True
        except (ValueError, OSError, AttributeError) as e:
            notes.append(f"{name}: {e}")
            return False

    limit("RLIMIT_CORE", 0)
    # A shared process ceiling (a normal user): set before any user namespace below, which then
    # enforces it on the real user as well.
    if linux and c["nproc_shared"] is not None:
        if limit("RLIMIT_NPROC", c["nproc_shared"]):
            done.append("process_count_shared_with_user")

    if c["unshare_net"]:  # without bubblewrap: empty network and pid namespaces (in a user namespace when not root)
        user = 0 if os.geteuid() == 0 else CLONE_NEWUSER
        if libc.unshare(CLONE_NEWNET | CLONE_NEWPID | user) == 0:
            done += ["network_namespace", "pid_namespace"]
            _enter_pid_namespace(libc)
            if user:  # the first process of a user namespace holds every capability in it
                _drop_capabilities(libc)
                if limit("RLIMIT_NPROC", c["nproc"] + 1):  # counts this namespace's tasks only (+1: its init)
                    done.append("process_count")
        else:
            failed("pid namespace")
            if libc.unshare(CLONE_NEWNET | user) == 0:
                done.append("network_namespace")
                if user:
                    _drop_capabilities(libc)
            else:
                failed("network namespace")

    if limit("RLIMIT_CPU", c["cpu"], c["cpu"] + 1):  # SIGXCPU at the soft limit, SIGKILL one second later
        done.append("cpu_time")
    if limit("RLIMIT_AS", c["memory"]):
        done.append("memory")
    if limit("RLIMIT_FSIZE", c["file_size"]):
        done.append("file_size")

    if c["uid"] is not None and os.geteuid() == 0:
        _switch_uid(c["uid"], libc, done, failed)
    if linux and c["nproc"] is not None and "process_count" not in done and c["nproc_shared"] is None:
        # RLIMIT_NPROC counts every task (threads too) of the real uid, or of the uid inside a
        # user namespace of its own; it never applies to root, hence the separate uid.
        if os.geteuid() == 0:
            notes.append("process count: no kernel limit (still root)")
        elif limit("RLIMIT_NPROC", c["nproc"]):
            done.append("process_count")
    if linux:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: other processes of this uid cannot ptrace it
        except OSError:
            pass
    return done, notes


def _enter_pid_namespace(libc) -> None:
    """After unshare(CLONE_NEWPID): fork an init (pid 1 of the new namespace) that forks the
    worker, which returns from here and runs the rest. When init ends, the kernel kills every
    process left in the namespace, daemons that called setsid() included; init dies with this
    process (PR_SET_PDEATHSIG), which the parent kills at the end. Exit statuses are relayed:
    a worker killed by signal N ends init with 128 + N (init cannot kill itself), and this
    process turns that back into signal N.
    """
    init = os.fork()
    if init:
        _close_extra_fds()
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        if 128 < code <= 128 + 64:
            code = -(code - 128)
        _exit_with(code)
    # PR_SET_PDEATHSIG. (Should the parent die before this, init is still in the parent's
    # process group, which the sandbox kills at the end.)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    worker = os.fork()
    if worker:
        _close_extra_fds()
        while True:  # reap every orphan until the worker ends
            try:
                pid, status = os.wait()
            except ChildProcessError:
                os._exit(70)
            if pid == worker:
                code = os.waitstatus_to_exitcode(status)
                os._exit(128 - code if code < 0 else code)


def _exit_with(code: int) -> None:
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _close_extra_fds() -> None:
    """A relay keeps nothing of the worker's open: the other ends see the worker's exit at once."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                pass


def _drop_capabilities(libc) -> None:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    caps = (ctypes.c_uint32 * 6)()
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), caps) != 0:
        sys.exit(f"sandbox: cannot drop the user namespace's capabilities: {os.strerror(ctypes.get_errno())}")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def _switch_uid(uid: int, libc, done: list[str], failed) -> None:
    """Root: become `uid` with no capabilities, except CAP_DAC_READ_SEARCH when Python is unreadable to it."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Caps(ctypes.Structure):
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
        caps = (Caps * 2)()
        caps[0].effective = caps[0].permitted = keep
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), caps) != 0:  # _LINUX_CAPABILITY_VERSION_3
            # PR_SET_KEEPCAPS kept the permitted set: running on could let the code become root again.
            why = os.strerror(ctypes.get_errno())
            sys.exit(f"sandbox: cannot drop capabilities after switching to uid {uid}: {why}")
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid binaries
            failed("no_new_privs")
        done.append("separate_uid")
        if keep:
            done.append("reads_all_files")
    except OSError as e:  # asked to leave root and could not: refuse to run the code as root
        sys.exit(f"sandbox: cannot switch to uid {uid}: {e}")


# ---------------------------------------------------------------------------------------------
# 3. The Python-level guard


def load_guard(source: str):
    """sandbox_guard.py's `install_guard`, compiled from its source under this file's name, so
    that tracebacks leave out the guard's frames as they leave out this file's."""
    namespace = {"__name__": "sandbox_guard"}
    exec(compile(source, FILENAME, "exec"), namespace)
    return namespace["install_guard"]


# ---------------------------------------------------------------------------------------------
# 4. main.py


def run_main(argv: list[str]) -> None:
    sys.argv = ["main.py", *argv]
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    try:
        with open("main.py", encoding="utf-8") as f:
            code = compile(f.read(), "main.py", "exec")
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        print_error(e)
        sys.exit(1)


def print_error(e: BaseException) -> None:
    """The traceback without this file's frames (the guard's own, when it refused something)."""
    shown = traceback.TracebackException(type(e), e, e.__traceback__)
    todo, seen = [shown], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if f.filename != FILENAME])
        todo += [c for c in (t.__cause__, t.__context__) if c is not None]
    print("".join(shown.format()), end="", file=sys.stderr)


if __name__ == "__main__":
    main()
