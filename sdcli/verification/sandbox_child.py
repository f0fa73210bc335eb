"""The sandbox's child side: what runs inside the sandboxed process, before the untrusted code.

sdcli/verification/sandbox_launch.py starts it as `python -I -c LAUNCH <this file's source> CONFIG_JSON`
in the run's folder, directly or inside bubblewrap. It imports nothing from sdcli, so it works where the
package itself cannot be read. In order, it:

1. sets up what only the process itself can: resource limits and the process count; when there
   is no bubblewrap, also pid and network namespaces where the kernel allows them (in a user
   namespace when not root), and, as root, a fresh uid without capabilities;
2. reports what took effect to the parent, on the status pipe;
3. installs the Python-level guard (`install_guard`);
4. runs main.py as __main__, with tracebacks that start in main.py.

The guard is an audit hook (`sys.addaudithook`: code cannot remove it) plus the removal of the
few calls that raise no audit event. It refuses: creating processes; sockets; ctypes, cffi and
native modules from outside the Python installation; signals to other processes; raising
limits; writing anywhere but the folder (and /dev/null); reading outside the folder, the Python
installation, /usr/share and the process's own /proc entry; relative paths with "..", and
opening folders outside those places (an open folder would let `dir_fd=` reach anywhere).
`strict` (used when no kernel boundary stands behind the guard) also refuses building code
objects from bytes (marshal, CodeType, assigning __code__), since crafted bytecode can corrupt
memory (imports then compile from source), native modules other than the standard library's
(a compiled package does its file and process work in C, unseen), and sqlite3. It is a Python-level guard: races (a symlink swapped
between the check and the call) and native code get around it. The kernel-level isolation in
sandbox.py is the boundary where the machine has it.
"""

import json
import os
import resource
import signal
import sys
import traceback
import types

# Calls that raise no audit event but create files (fifos, device nodes), leave the process
# group, or act on other processes. They are replaced by a function that refuses, in os and
# posix alike, and their originals dropped (see _drop_unaudited).
UNAUDITED_OS = (
    "mkfifo",
    "mknod",
    "setsid",
    "setpgid",
    "setpgrp",
    "login_tty",
    "pidfd_open",
    "setpriority",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setparam",
)
UNAUDITED_SIGNAL = ("pidfd_send_signal",)

# Native modules that reach arbitrary C calls or process creation without an audit event, or
# run code without this interpreter's audit hooks (subinterpreters).
REFUSED_IMPORTS = frozenset(
    {
        "_posixsubprocess",
        "_ctypes",
        "_cffi_backend",
        "_posixshmem",
        "_xxsubinterpreters",
        "_xxinterpchannels",
        "_xxinterpqueues",
        "_interpreters",
        "_interpchannels",
        "_interpqueues",
        "_testcapi",
        "_testinternalcapi",
        "_testmultiphase",
        "_testsinglephase",
        "_testimportmultiple",
        "_testbuffer",
        "_testclinic",
        "_ctypes_test",
        "syslog",
        "_tkinter",  # Tcl runs commands and opens files natively
        "_ssl",  # reads key and certificate files natively (and there is no network)
        "_dbm",
        "_gdbm",
        "_multiprocessing",  # named semaphores are files in /dev/shm
        "ossaudiodev",
        "readline",  # write_history_file() writes anywhere, unaudited
    }
)
# Refused too in strict mode (no kernel boundary behind the guard).
STRICT_IMPORTS = frozenset({"_sqlite3"})  # ATTACH DATABASE and VACUUM INTO write files natively

REFUSED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.killpg",
        "subprocess.Popen",
        "pty.spawn",
        "resource.setrlimit",
        "resource.prlimit",
        # Ways to reach the guard's own function or frame (and so its closure): refused.
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.settrace",
        "sys.setprofile",
        "sys.monitoring.register_callback",
        "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
    }
)
REFUSED_PREFIXES = ("socket.", "ctypes.", "syslog.", "_winapi.", "winreg.")
STRICT_EVENTS = frozenset({"marshal.loads", "marshal.load", "code.__new__"})

# event -> ((path index, dir_fd index or None), ...) for calls that change the file system.
# Each path must be inside the folder.
WRITE_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),  # the source too: a hard link to an outside file writes that file
    "os.symlink": ((1, 2),),  # the target is checked on its own below
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),),
    "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)),
    "fcntl.flock": ((0, None),),
    "fcntl.lockf": ((0, None),),
    "sqlite3.connect": ((0, None),),  # SQLite opens (and creates) the file itself
}
# event -> index of the path (or fd) that is read.
READ_EVENTS = {"os.listdir": 0, "os.scandir": 0, "os.chdir": 0, "os.listxattr": 0, "os.getxattr": 0}
READABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})

CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000
FILENAME = "<sandbox>"  # this file's name in tracebacks (LAUNCH compiles it under this name)
LAUNCH = "import sys; exec(compile(sys.argv.pop(1), '<sandbox>', 'exec'))"  # python -I -c LAUNCH SOURCE CONFIG
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def main() -> None:
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


def install_guard(root: str, *, strict: bool) -> None:
    """Install the audit hook and drop the unaudited calls; see the module docstring for what it refuses.

    The hook keeps everything it uses in its own closure, taken now: C functions (posix.lstat,
    readlink, getcwd), builtins and frozen sets. It calls no Python-level helper (os.path,
    os.fsdecode, builtins looked up at call time), since the code under test could replace
    those. Its function object is unreachable: gc's object listings and trace functions (the
    ways to reach it or its frame while it runs) are refused too.
    """
    import _imp
    import posix
    import signal

    lstat, readlink, getcwd, getpid = posix.lstat, posix.readlink, posix.getcwd, posix.getpid
    _type, _str, _bytes, _int, _len, _tuple = type, str, bytes, int, len, tuple
    PE, OSErr, ValErr, TypeErr, ImportErr = PermissionError, OSError, ValueError, TypeError, ImportError
    refused_events, refused_prefixes, strict_events = REFUSED_EVENTS, REFUSED_PREFIXES, STRICT_EVENTS
    refused_imports, write_events, read_events = REFUSED_IMPORTS, _freeze(WRITE_EVENTS), _freeze(READ_EVENTS)
    devices, write_flags = READABLE_DEVICES, WRITE_FLAGS
    pid = getpid()

    def real(path, base=None):
        """The absolute path with every symlink resolved, like os.path.realpath; None past 40 links."""
        if not path.startswith("/"):
            path = (base if base is not None else getcwd()) + "/" + path
        parts = [p for p in path.split("/") if p and p != "."]
        parts.reverse()  # a stack: the next component is last
        done, links = "", 0
        while parts:
            name = parts.pop()
            if name == "..":
                done = done[: done.rfind("/")]
                continue
            candidate = done + "/" + name
            try:
                is_link = lstat(candidate).st_mode & 0o170000 == 0o120000
            except (OSErr, ValErr):
                is_link = False
            if not is_link:
                done = candidate
                continue
            links += 1
            try:
                target = readlink(candidate)
            except (OSErr, ValErr):
                return None
            if links > 40:
                return None
            if target.startswith("/"):
                done = ""
            more = [p for p in target.split("/") if p and p != "."]
            more.reverse()
            parts.extend(more)
        return done or "/"

    def under(path, top):
        return path == top or path.startswith(top + "/") or top == "/"

    def as_text(path):
        t = _type(path)
        if t is _str:
            return path
        if t is _bytes:
            return path.decode("utf-8", "surrogateescape")
        return None  # the events carry paths already converted by os.fspath; anything else is refused

    def resolve(path, dir_fd=None):
        """The real absolute path `path` (a path, or an open fd) names, or None when unknown."""
        try:
            if _type(path) is _int:
                return real(readlink(f"/proc/self/fd/{path}"), "/proc/self/fd")
            text = as_text(path)
            if text is None:
                return None
            if not text.startswith("/") and _type(dir_fd) is _int and dir_fd >= 0:
                return real(text, readlink(f"/proc/self/fd/{dir_fd}"))
            return real(text)
        except (OSErr, ValErr):
            return None

    root = real(root)
    prefixes = {real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    # Python's own folders: the sys.path entries `python -I` computes that lie inside the
    # installation (an editable install's project folder, which may hold the data, is left out).
    python_dirs = _tuple(sorted({real(p) for p in sys.path if p and any(under(real(p), q) for q in prefixes)}))
    read_roots = (root, *python_dirs, "/usr/share", real("/proc/self") or "/proc/self")  # its own /proc entry
    suffixes = _tuple(_imp.extension_suffixes())
    # Native modules may come from Python's own folders; in strict mode from the standard
    # library's only: a compiled package (numpy, safetensors, psutil) does file and process
    # work in C that no audit event sees.
    stdlib = real(os.path.dirname(os.__file__))
    native_dirs = (stdlib,) if strict else python_dirs
    if strict:
        refused_imports = refused_imports | STRICT_IMPORTS

    def native_allowed(p):
        for top in native_dirs:
            rest = p[_len(top) :]
            if under(p, top) and not (strict and ("/site-packages/" in rest or "/dist-packages/" in rest)):
                return True
        return False

    def inside_python(p):
        for top in python_dirs:
            if under(p, top):
                return True
        return False

    def readable(p):
        if p is None:
            return False
        for top in read_roots:
            if under(p, top):
                return True
        return p in devices

    def check(path, dir_fd, write, what):
        p = resolve(path, dir_fd)
        ok = (p is not None and (under(p, root) or p == "/dev/null")) if write else readable(p)
        if not ok:
            verb = "writing" if write else "reading"
            shown = path if _type(path) in (_str, _bytes, _int) else _type(path).__name__
            raise PE(f"sandbox: {what}: {verb} outside the working folder is not allowed: {shown!r}")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return  # wraps an already-open file descriptor
            writing = (_type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                _type(flags) is _int and flags & write_flags
            )
            text = as_text(path)
            if text is not None and not text.startswith("/") and ".." in text.split("/"):
                # os.open(..., dir_fd=) raises this event without the dir_fd, so a relative path
                # that climbs out of it cannot be checked: refuse it.
                raise PE(f"sandbox: relative paths with '..' are not allowed: {text!r}")
            check(path, None, writing, "open")
            # A folder opened outside would let os.open(..., dir_fd=) reach anywhere.
            p = resolve(path)
            try:
                is_dir = lstat(p).st_mode & 0o170000 == 0o040000
            except (OSErr, ValErr, TypeErr):
                is_dir = False
            if is_dir and not (under(p, root) or inside_python(p)):
                raise PE(f"sandbox: opening a folder outside the working folder is not allowed: {text!r}")
        elif event in write_events:
            for i, fd_i in write_events[event]:
                if i < _len(args) and args[i] is not None:
                    check(args[i], args[fd_i] if fd_i is not None and fd_i < _len(args) else None, True, event)
            if event == "os.symlink":  # the link must point inside, wherever it is moved to later
                target = as_text(args[0])
                p = real(target) if target is not None and target.startswith("/") else ""
                if target is None or p is None or (p and not under(p, root)):
                    raise PE(f"sandbox: a symlink to outside the working folder is not allowed: {target!r}")
                if not target.startswith("/") and ".." in target.split("/"):
                    raise PE(f"sandbox: a symlink target with '..' is not allowed: {target!r}")
        elif event in read_events:
            path = args[read_events[event]]
            check("." if path is None else path, None, False, event)
        elif event == "import":
            name, filename = args[0], args[1]
            # ImportError, so the standard library's fallbacks (hashlib, dbm, ...) still work.
            if _type(name) is _str and name.rpartition(".")[2] in refused_imports:
                raise ImportErr(f"sandbox: the module {name} is not allowed (it reaches processes or native calls)")
            if _type(filename) is _str and filename.endswith(suffixes):
                p = real(filename)
                base = filename.rpartition("/")[2].partition(".")[0]
                if base in refused_imports or p is None or not native_allowed(p):
                    where = "the standard library" if strict else "the Python installation"
                    raise ImportErr(f"sandbox: only native modules of {where} may load here, not {filename}")
        elif event in refused_events or event.startswith(refused_prefixes):
            raise PE(f"sandbox: {event} is not allowed (no processes, network, native calls or sandbox internals)")
        elif event == "os.kill" and args[0] != pid:
            raise PE("sandbox: signalling other processes is not allowed")
        elif event == "object.__setattr__" and _len(args) > 1 and args[1] == "__code__":
            raise PE("sandbox: replacing a function's code is not allowed")
        elif strict and event in strict_events:
            raise PE(f"sandbox: {event} is not allowed (code is compiled from source only)")

    _drop_unaudited(posix, signal, _imp)
    if strict:
        # Imports compile from source: no __pycache__ is found here, and marshal.loads is refused.
        sys.pycache_prefix = root + "/.no-bytecode"
    sys.addaudithook(hook)


def _freeze(mapping: dict) -> types.MappingProxyType:
    return types.MappingProxyType(dict(mapping))


def _drop_unaudited(posix, signal, _imp) -> None:
    """Replace the unaudited calls by refusals, and stop fresh copies of builtin modules being made.

    A builtin module deleted from sys.modules and imported again comes back whole, so every
    builtin module is imported now and `_imp.create_builtin` afterwards only hands out those
    (patched) objects. The replacement holds no reference to the original function.
    """
    import _signal
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spwd and the like announce their deprecation on import
        for name in sys.builtin_module_names:
            if name not in REFUSED_IMPORTS:  # some builds (Debian's) have _posixsubprocess built in
                __import__(name)
    for name in REFUSED_IMPORTS & set(sys.modules):  # loaded before the guard (by a .pth file, say)
        module = sys.modules.pop(name)
        for attr, value in list(vars(module).items()):
            if callable(value) and not attr.startswith("__"):
                setattr(module, attr, _refusal(f"{name}.{attr}"))
    for modules, names in (((os, posix), UNAUDITED_OS), ((signal, _signal), UNAUDITED_SIGNAL)):
        for name in names:
            for module in modules:
                if hasattr(module, name):
                    setattr(module, name, _refusal(f"{module.__name__}.{name}"))
    for group in ("supports_dir_fd", "supports_fd", "supports_follow_symlinks", "supports_effective_ids"):
        setattr(os, group, {f for f in getattr(os, group) if getattr(f, "__name__", None) not in UNAUDITED_OS})
    existing = {name: sys.modules[name] for name in sys.builtin_module_names if name in sys.modules}

    def create_builtin(spec):
        if spec.name in existing:
            return existing[spec.name]
        raise ImportError(f"sandbox: builtin module {spec.name} is not available", name=spec.name)

    _imp.create_builtin = create_builtin


def _refusal(name: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed (no processes, sessions, special files or native calls)")

    refused.__name__ = name
    return refused


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
