"""The sandbox's Python-level guard, installed in the sandboxed process before the untrusted code runs.

sandbox_child.py, which runs first in that process, compiles this file's source (sent along with
its own, as text: sdcli cannot be imported there) under the same name, "<sandbox>", and calls
`install_guard`. Like it, this file imports only the standard library.

The guard is an audit hook (`sys.addaudithook`: code cannot remove it) plus the removal of the
few calls that raise no audit event. It refuses: creating processes; sockets; ctypes, cffi and
native modules from outside the Python installation; signals to other processes; raising
limits; writing anywhere but the folder (and /dev/null); reading outside the folder, the Python
installation, /usr/share and the process's own /proc entry; relative paths with "..", and
opening folders outside those places (an open folder would let `dir_fd=` reach anywhere).
`strict` (used when no kernel boundary stands behind the guard) also refuses building code
objects from bytes (marshal, CodeType, assigning __code__), since crafted bytecode can corrupt
memory (imports then compile from source), native modules other than the standard library's
(a compiled package does its file and process work in C, unseen), and sqlite3. It is a
Python-level guard: races (a symlink swapped between the check and the call) and native code
get around it. The kernel-level isolation in sandbox.py is the boundary where the machine has it.

The guard runs in the same interpreter as the code it guards, so the code can see it: the
traceback of a refusal (or of any error raised inside the hook) holds the hook's frames, whose
f_locals, f_globals and f_back are open to it, as are `inspect` and the functions those frames
hold. Reading all that is allowed (tracebacks of the code's own errors must print); what the
guard promises, at the process level where it is the last line, is that nothing the code can
reach changes what the hook does:

- the hook and its rules keep no closure cells (a cell's contents can be rebound with no audit
  event) and look up no global or builtin when they run: everything they use is a default
  argument, held in the function's `__defaults__` tuple, and every value there is immutable
  (str, int, tuple, frozenset, C functions, builtin types, and functions built the same way);
  no dict, set or mappingproxy that it reads (comparing a mappingproxy with a dict subclass
  hands it the dict); the guard's module namespace is held only to recognise its functions (`is`);
- the one way to change those (assigning or deleting `__defaults__`, `__kwdefaults__` or
  `__code__`) raises an audit event, which the hook refuses for the guard's functions;
- whatever the code hands the hook (`sys.audit` raises any event with any arguments) is
  type-checked before it is compared or asked for anything, so the hook never calls the code's
  methods, and the hook raises no audit event itself, so the code's own audit hooks never run
  inside it;
- no exception is taken for the file system's answer ("not a symlink", "not a folder"): the
  code's signal handlers run between two bytecodes of the hook and can raise anywhere in it;
- gc's object listings, trace and profile functions, and other threads' frames
  (`sys._current_frames`, `sys._current_exceptions`) are refused.

What it does not promise: that the guard's frames or its settings (the folder, the paths it
reads) stay hidden; anything against native code, a memory-safety bug in CPython, or a race in
the file system; and, on Python 3.13 and later, anything against code that runs while the hook
does (a signal handler, a finalizer run by the garbage collector) and writes the running
hook's locals through `frame.f_locals`, which became writable there (PEP 667). Bubblewrap is
the boundary; at the process level the guard is a last line that a determined attacker who
finds a gap in CPython gets past.
"""

import os
import sys
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
        # Ways to reach the guard's functions, or its frames while they run (another thread's,
        # whose locals Python 3.13 lets code rebind): refused.
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.settrace",
        "sys.setprofile",
        "sys.monitoring.register_callback",
        "sys._current_frames",
        "sys._current_exceptions",
        "sqlite3.enable_load_extension",
        "sqlite3.load_extension",
    }
)
REFUSED_PREFIXES = ("socket.", "ctypes.", "syslog.", "_winapi.", "winreg.")
# A guard function's attributes that hold what it runs with: assigning or deleting them is refused.
GUARD_ATTRIBUTES = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
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
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def install_guard(root: str, *, strict: bool) -> None:
    """Install the audit hook and drop the unaudited calls; see the module docstring for what it refuses.

    The hook keeps everything it uses in its functions' default arguments, taken now: C
    functions (posix.lstat, readlink, getcwd, access), builtins, strings, tuples and frozen sets.
    It calls no Python-level helper (os.path, os.fsdecode, builtins looked up at call time),
    since the code under test could replace those. The functions below build the hook's parts:
    each takes what its functions use as arguments and binds it as their defaults, never in a
    closure, so nothing is looked up later and nothing the code reaches can be rebound (see the
    module docstring).
    """
    import _imp
    import posix
    import signal

    paths = _path_functions(posix.lstat, posix.readlink, posix.getcwd, posix.access)
    real, under = paths[:2]
    root = real(root)
    prefixes = {real(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    # Python's own folders: the sys.path entries `python -I` computes that lie inside the
    # installation (an editable install's project folder, which may hold the data, is left out).
    python_dirs = tuple(sorted({real(p) for p in sys.path if p and any(under(real(p), q) for q in prefixes)}))
    read_roots = (root, *python_dirs, "/usr/share", real("/proc/self") or "/proc/self")  # its own /proc entry
    # Native modules may come from Python's own folders; in strict mode from the standard
    # library's only: a compiled package (numpy, safetensors, psutil) does file and process
    # work in C that no audit event sees.
    stdlib = real(os.path.dirname(os.__file__))
    native_dirs = (stdlib,) if strict else python_dirs
    on_files = _file_rules(paths, root, python_dirs, read_roots)
    on_import = _import_rule(real, under, native_dirs, tuple(_imp.extension_suffixes()), strict)
    hook = _audit_hook(on_files, on_import, posix.getpid(), strict)
    _drop_unaudited(posix, signal, _imp)
    if strict:
        # Imports compile from source: no __pycache__ is found here, and marshal.loads is refused.
        sys.pycache_prefix = root + "/.no-bytecode"
    sys.addaudithook(hook)


def _path_functions(lstat, readlink, getcwd, access) -> tuple:
    """(real, under, as_text, resolve, file_type): the hook's path arithmetic, on the C functions given.

    No answer here comes from an exception taken to mean "nothing there": Python runs the code's
    signal handlers between two bytecodes of whatever runs, the hook included, and an exception
    one raises inside a `try` would be taken for the file system's answer (not a symlink, not a
    folder). Where an exception is caught, the answer is "unknown" (None), which the rules refuse.
    """

    def file_type(path, lstat=lstat, access=access, OSErr=OSError):
        """The type bits of the entry `path` names (a symlink itself, not followed); 0 where there is none."""
        try:
            return lstat(path).st_mode & 0o170000
        except OSErr:
            pass  # nothing there, or an exception raised into the hook: ask in a way that cannot be faked
        if not access(path, 0, effective_ids=True, follow_symlinks=False):  # F_OK: returns, never raises
            return 0
        return lstat(path).st_mode & 0o170000  # there after all (or a race): an error here refuses the event

    def real(path, base=None, file_type=file_type, readlink=readlink, getcwd=getcwd, OSErr=OSError, ValErr=ValueError):
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
            if file_type(candidate) != 0o120000:
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

    def as_text(path, _type=type, _str=str, _bytes=bytes):
        t = _type(path)
        if t is _str:
            return path
        if t is _bytes:
            return path.decode("utf-8", "surrogateescape")
        return None  # the events carry paths already converted by os.fspath; anything else is refused

    def resolve(
        path, dir_fd=None, real=real, as_text=as_text, readlink=readlink, _type=type, _int=int,
        OSErr=OSError, ValErr=ValueError,
    ):
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

    return real, under, as_text, resolve, file_type


def _file_rules(paths: tuple, root: str, python_dirs: tuple, read_roots: tuple) -> tuple:
    """(on_open, on_write, on_read): the hook's rules for the events that touch files."""
    real, under, as_text, resolve, file_type = paths
    PE = PermissionError
    type_name = type.__dict__["__name__"].__get__  # a type's own name: no metaclass property is asked

    def inside_python(p, python_dirs=tuple(python_dirs), under=under):
        for top in python_dirs:
            if under(p, top):
                return True
        return False

    def readable(p, read_roots=tuple(read_roots), devices=READABLE_DEVICES, under=under):
        if p is None:
            return False
        for top in read_roots:
            if under(p, top):
                return True
        return p in devices

    def check(
        path, dir_fd, write, what, resolve=resolve, under=under, readable=readable, root=root,
        _type=type, _str=str, _bytes=bytes, _int=int, PE=PE, type_name=type_name,
    ):
        p = resolve(path, dir_fd)
        ok = (p is not None and (under(p, root) or p == "/dev/null")) if write else readable(p)
        if not ok:
            verb = "writing" if write else "reading"
            shown = path if _type(path) in (_str, _bytes, _int) else type_name(_type(path))
            raise PE(f"sandbox: {what}: {verb} outside the working folder is not allowed: {shown!r}")

    def on_open(
        args, check=check, resolve=resolve, as_text=as_text, under=under, inside_python=inside_python,
        file_type=file_type, root=root, write_flags=WRITE_FLAGS, _type=type, _str=str, _int=int, PE=PE,
    ):
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
        if p is None:  # check() just resolved it: a race, or an exception raised into the hook
            raise PE(f"sandbox: open: cannot tell where {text!r} is")
        if file_type(p) == 0o040000 and not (under(p, root) or inside_python(p)):
            raise PE(f"sandbox: opening a folder outside the working folder is not allowed: {text!r}")

    def on_write(
        event, places, args, check=check, as_text=as_text, real=real, under=under, root=root, _type=type, _int=int,
        _len=len, PE=PE,
    ):
        """`places`: the event's ((path index, dir_fd index or None), ...) in WRITE_EVENTS."""
        for i, fd_i in places:
            if i < _len(args) and args[i] is not None:
                check(args[i], args[fd_i] if fd_i is not None and fd_i < _len(args) else None, True, event)
        if event == "os.symlink":  # the link must point inside, wherever it is moved to later
            target = as_text(args[0])
            p = real(target) if target is not None and target.startswith("/") else ""
            if target is None or p is None or (p and not under(p, root)):
                raise PE(f"sandbox: a symlink to outside the working folder is not allowed: {target!r}")
            if not target.startswith("/") and ".." in target.split("/"):
                raise PE(f"sandbox: a symlink target with '..' is not allowed: {target!r}")

    def on_read(event, path, check=check):
        check("." if path is None else path, None, False, event)

    return on_open, on_write, on_read


def _import_rule(real, under, native_dirs: tuple, suffixes: tuple, strict: bool):
    """The hook's rule for imports: no refused module, and native modules from `native_dirs` only."""
    refused_imports = REFUSED_IMPORTS | STRICT_IMPORTS if strict else REFUSED_IMPORTS

    def native_allowed(p, native_dirs=tuple(native_dirs), under=under, strict=strict, _len=len):
        for top in native_dirs:
            rest = p[_len(top) :]
            if under(p, top) and not (strict and ("/site-packages/" in rest or "/dist-packages/" in rest)):
                return True
        return False

    def on_import(
        args, refused_imports=refused_imports, suffixes=tuple(suffixes), real=real, native_allowed=native_allowed,
        where="the standard library" if strict else "the Python installation", _type=type, _str=str,
        ImportErr=ImportError,
    ):
        name, filename = args[0], args[1]
        # ImportError, so the standard library's fallbacks (hashlib, dbm, ...) still work.
        if _type(name) is _str and name.rpartition(".")[2] in refused_imports:
            raise ImportErr(f"sandbox: the module {name} is not allowed (it reaches processes or native calls)")
        if _type(filename) is _str and filename.endswith(suffixes):
            p = real(filename)
            base = filename.rpartition("/")[2].partition(".")[0]
            if base in refused_imports or p is None or not native_allowed(p):
                raise ImportErr(f"sandbox: only native modules of {where} may load here, not {filename}")

    return on_import


def _audit_hook(on_files: tuple, on_import, pid: int, strict: bool):
    """The audit hook: each event to its rule; processes, network and native calls refused outright."""
    on_open, on_write, on_read = on_files
    write_events, read_events = tuple(WRITE_EVENTS.items()), tuple(READ_EVENTS.items())

    def hook(
        event, args, on_open=on_open, on_write=on_write, on_read=on_read, on_import=on_import,
        write_events=write_events, write_names=frozenset(WRITE_EVENTS), read_events=read_events,
        read_names=frozenset(READ_EVENTS), refused_events=REFUSED_EVENTS, refused_prefixes=REFUSED_PREFIXES,
        strict_events=STRICT_EVENTS, strict=strict, pid=pid, own_globals=globals(), own_attributes=GUARD_ATTRIBUTES,
        _len=len, _type=type, _int=int, _str=str, _function=types.FunctionType, PE=PermissionError,
    ):
        # Every value the code can hand the hook (sys.audit raises any event with any arguments)
        # is type-checked before it is compared or asked for anything: the hook never calls a
        # method of the code's, and does nothing that raises an audit event of its own.
        if event == "open":
            on_open(args)
        elif event in write_names:
            for name, places in write_events:
                if name == event:
                    on_write(event, places, args)
        elif event in read_names:
            for name, i in read_events:
                if name == event:
                    on_read(event, args[i])
        elif event == "import":
            on_import(args)
        elif event in refused_events or event.startswith(refused_prefixes):
            raise PE(f"sandbox: {event} is not allowed (no processes, network, native calls or sandbox internals)")
        elif event == "os.kill" and not (_type(args[0]) is _int and args[0] == pid):
            raise PE("sandbox: signalling other processes is not allowed")
        elif (event == "object.__setattr__" or event == "object.__delattr__") and _len(args) > 1:
            obj, name = args[0], args[1]
            if _type(name) is _str and name == "__code__":
                raise PE("sandbox: replacing a function's code is not allowed")
            if _type(obj) is _function and _type(name) is _str and name in own_attributes:
                # __globals__, unlike __code__, is read with no audit event
                if obj.__globals__ is own_globals:
                    raise PE("sandbox: changing the sandbox guard's functions is not allowed")
        elif strict and event in strict_events:
            raise PE(f"sandbox: {event} is not allowed (code is compiled from source only)")

    return hook


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
