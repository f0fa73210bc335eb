"""The escapes reported against the old sandbox, each one as an attack that must now fail.

Model code, run by a normal user, overwrote the user's episode adapter, deleted its
episode.json, could signal the trainer and left a `setsid` daemon running; as root it left
files in world-writable folders and read a 0600 secret. Each attack runs at both isolation
levels, with the Python guard (which must stop it at process level, through the bypasses that
were reported: dir_fd, re-importing _posixsubprocess, os.link, os.mkfifo, ...) and, where
bubblewrap is the level, without it (the kernel must stop it on its own).

test_sandbox_as_user.py runs this file again as a normal user.
"""

from __future__ import annotations

import dis
import os
import signal
import stat
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest
from sandbox_helpers import marker, missing_isolation, survivors

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification import sandbox_guard as guard
from sdcli.verification import sandbox_process
from sdcli.verification.sandbox import isolation, run_python

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the escapes tested are Linux-specific")

LIMITS = SandboxLimits(wall_seconds=5, cpu_seconds=3, memory_mb=256, output_bytes=20_000, max_processes=8)


WHERE = {
    "bubblewrap-guard": ("bubblewrap", True),
    "bubblewrap-no_guard": ("bubblewrap", False),  # the kernel alone
    "process-guard": ("process", True),
    "process-guard-no_namespaces": ("process", True),  # as in a container that allows no namespace
}


@pytest.fixture(params=list(WHERE))
def where(request, monkeypatch) -> tuple[str, bool]:
    """(level, guards). At process level the guard is what stops these (the README says so), so
    it is tested on there, with and without the namespaces the machine may allow."""
    level, guards = WHERE[request.param]
    if level == "bubblewrap" and isolation().level != "bubblewrap":
        missing_isolation(f"bubblewrap is not usable here ({isolation().why}); apt-get install bubblewrap to test it")
    if request.param.endswith("no_namespaces"):
        monkeypatch.setattr(sandbox_process, "_PROCESS_NAMESPACES", False)
    return level, guards


def attack(code: str, where: tuple[str, bool], **kw):
    level, guards = where
    return run_python(textwrap.dedent(code), LIMITS, level=level, guards=guards, **kw)


@pytest.fixture()
def episode(tmp_path):
    """A user's episode folder: an adapter and episode.json, as this user (root or not) owns them."""
    folder = tmp_path / "runs" / "demo" / "episodes" / "001"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "episode.json").write_text('{"episode": 1}')
    return folder


def assert_untouched(folder: Path):
    assert (folder / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (folder / "episode.json").read_text() == '{"episode": 1}'
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "episode.json"]


def test_dir_fd_write_outside(where, episode):
    r = attack(
        f"""
        import os
        fd = os.open({str(episode)!r}, os.O_RDONLY)
        out = os.open("adapter_model.safetensors", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
        os.write(out, b"hacked")
        os.unlink("episode.json", dir_fd=fd)
        """,
        where,
    )
    assert r.returncode != 0
    assert_untouched(episode)


def test_dir_fd_inside_then_climbing_out(where, episode):
    rel = os.path.relpath(episode, "/")
    r = attack(
        f"""
        import os
        os.makedirs("a/b/c/d/e/f/g/h/i/j/k/l", exist_ok=True)
        fd = os.open(".", os.O_RDONLY)
        os.chdir("a/b/c/d/e/f/g/h/i/j/k/l")
        up = "../" * 40
        out = os.open(up + {rel!r} + "/adapter_model.safetensors", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
        os.write(out, b"hacked")
        """,
        where,
    )
    assert r.returncode != 0
    assert_untouched(episode)


def test_reimported_posixsubprocess_cannot_start_a_process(where, episode):
    r = attack(
        f"""
        import sys
        sys.modules.pop("_posixsubprocess", None)
        import _posixsubprocess
        import os
        _posixsubprocess.fork_exec(
            [b"/bin/rm", b"-f", {str(episode / "episode.json")!r}.encode()], [b"/bin/rm"], True, (), None, None,
            -1, -1, -1, -1, -1, -1, -1, -1, False, False, None, None, None, -1, None, False)
        """,
        where,
    )
    assert r.returncode != 0
    assert_untouched(episode)


@pytest.mark.parametrize(
    "how",
    [
        "import importlib, sys; sys.modules.pop('_posixsubprocess', None); importlib.import_module('_posixsubprocess')",
        "import importlib.util as u; s = u.find_spec('_posixsubprocess'); u.module_from_spec(s)",
        "import sys; sys.modules.pop('posix'); import posix; posix.mkfifo('x'); print('got mkfifo')",
        "import _imp, importlib.util as u; m = _imp.create_builtin(u.find_spec('posix')); m.mkfifo('x')",
        "import importlib, posix; importlib.reload(posix); posix.mkfifo('x')",
        "import os; os.mkfifo('x')",
        "import os; os.mknod('x')",
        "import signal, os; signal.pidfd_send_signal(os.pidfd_open(1), 0)",
        "import os; os.setsid()",
        "import ctypes; ctypes.CDLL(None).setsid()",
        "import gc; [o for o in gc.get_objects()]",
        "import sys; sys.settrace(lambda *a: None)",
        "import marshal; marshal.loads(marshal.dumps((lambda: 0).__code__))",
        "f = lambda: 0; f.__code__ = f.__code__.replace(co_consts=(1,))",
        "import readline; readline.write_history_file('/var/tmp/sd-history')",
        "import sqlite3; sqlite3.connect(':memory:').execute(\"ATTACH DATABASE '/var/tmp/sd.db' AS x\")",
        "import importlib.machinery as m, importlib.util as u, shutil\n"
        "name = 'mine' + m.EXTENSION_SUFFIXES[0]\n"
        "shutil.copyfile(u.find_spec('_json').origin, name)\n"
        "u.module_from_spec(u.spec_from_file_location('_json', name))",
    ],
)
def test_guard_bypasses_reported_or_known_are_closed(how):
    """At process level the guard is the only thing between the code and these calls."""
    r = attack(how, ("process", True))
    assert r.returncode != 0 and "sandbox: " in r.stderr, r.stderr
    assert "got mkfifo" not in r.stdout
    assert not os.path.exists("/var/tmp/sd-history") and not os.path.exists("/var/tmp/sd.db")


def test_monkeypatching_what_the_guard_uses_does_not_open_it(episode):
    """The guard keeps its own references: replacing os.path, posixpath or builtins changes nothing."""
    r = attack(
        f"""
        import builtins, os, posixpath
        posixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd() + "/x"
        posixpath._joinrealpath = lambda *a: (os.getcwd() + "/x", True)
        os.fsdecode = os.fspath = lambda p: "inside"
        builtins.any = builtins.isinstance = lambda *a: True
        open({str(episode / "episode.json")!r}, "w").write("hacked")
        """,
        ("process", True),
    )
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    assert_untouched(episode)


def test_the_guard_looks_nothing_up_while_it_runs():
    """The hook and the rules it calls read only their arguments and defaults, never a global or a
    builtin at call time (the code under test could replace those), however the guard is split."""
    builders = (guard._path_functions, guard._file_rules, guard._import_rule, guard._audit_hook)
    todo = [c for b in builders for c in b.__code__.co_consts if isinstance(c, types.CodeType)]
    assert len(todo) >= 10  # real, under, as_text, resolve, the file and import rules, the hook
    while todo:
        code = todo.pop()
        looked_up = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
        assert not looked_up, f"{code.co_name} reads {sorted(looked_up)} when it runs"
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]


def test_hard_link_to_an_outside_file_then_writing_it(where, episode):
    r = attack(
        f"""
        import os
        os.link({str(episode / "adapter_model.safetensors")!r}, "mine")
        open("mine", "wb").write(b"hacked")
        """,
        where,
    )
    assert r.returncode != 0
    assert_untouched(episode)


def test_symlink_to_outside_then_writing_through_it(where, episode):
    r = attack(
        f"""
        import os
        os.symlink({str(episode)!r}, "link")
        open("link/episode.json", "w").write("hacked")
        """,
        where,
    )
    assert r.returncode != 0
    assert_untouched(episode)


def test_mkfifo_and_files_outside(where, episode):
    r = attack(f"import os\nos.mkfifo({str(episode / 'fifo')!r})", where)
    assert r.returncode != 0
    assert_untouched(episode)


def test_deleting_and_overwriting_the_episode(where, episode):
    r = attack(
        f"""
        import os, shutil
        errors = []
        for step in (
            lambda: open({str(episode / "adapter_model.safetensors")!r}, "wb").write(b"hacked"),
            lambda: os.remove({str(episode / "episode.json")!r}),
            lambda: os.rename({str(episode / "episode.json")!r}, "stolen.json"),
            lambda: os.chmod({str(episode)!r}, 0o000),
            lambda: shutil.rmtree({str(episode)!r}),
        ):
            try:
                step()
            except Exception as e:
                errors.append(type(e).__name__)
        print(errors)
        """,
        where,
    )
    assert r.stdout.count("Error") == 5, (r.stdout, r.stderr)
    assert_untouched(episode)


@pytest.fixture()
def signalled():
    """Counts SIGUSR2 delivered to this process (the trainer, as far as the sandbox knows)."""
    got = []
    old = signal.signal(signal.SIGUSR2, lambda *a: got.append(1))
    yield got
    signal.signal(signal.SIGUSR2, old)


def test_signalling_the_trainer(where, signalled):
    me = os.getpid()
    r = attack(
        f"""
        import os, signal
        for how in (lambda: os.kill({me}, signal.SIGUSR2),
                    lambda: signal.pidfd_send_signal(os.pidfd_open({me}), signal.SIGUSR2),
                    lambda: os.kill(0, signal.SIGUSR2), lambda: os.kill(-1, signal.SIGUSR2),
                    lambda: os.killpg(os.getpgid({me}), signal.SIGUSR2)):
            try:
                how()
            except Exception as e:
                print(type(e).__name__)
        """,
        where,
    )
    time.sleep(0.2)
    assert signalled == [], r.stdout + r.stderr


def test_a_setsid_daemon_does_not_outlive_the_run(where):
    mark = marker()
    r = attack(
        """
        import os, sys, time
        try:
            import _posixsubprocess  # refused by the guard; without it, os.fork works
        except PermissionError:
            pass
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "30", sys.argv[1]])
            os._exit(0)
        print("daemon started")
        """,
        where,
        args=[mark],
    )
    if where[1]:
        assert "sandbox:" in r.stderr and "daemon started" not in r.stdout
    time.sleep(0.3)
    assert survivors(mark) == [], "a daemon outlived the sandbox"


WORLD_WRITABLE = ["/tmp", "/var/tmp", "/dev/shm"]


def test_no_files_left_in_world_writable_folders(where):
    mark = marker()
    r = attack(
        f"""
        import os
        for top in {WORLD_WRITABLE!r}:
            try:
                with open(os.path.join(top, {mark!r}), "wb") as f:
                    f.write(b"x" * 1000)
            except OSError as e:
                print(top, type(e).__name__)
        """,
        where,
    )
    left = [top for top in WORLD_WRITABLE if os.path.exists(os.path.join(top, mark))]
    for top in left:
        os.remove(os.path.join(top, mark))
    assert left == [], r.stdout


@pytest.fixture()
def secret(tmp_path):
    """A 0600 file in a 0700 folder, as the user running sd keeps a token or a key."""
    home = os.path.expanduser("~")
    folder = Path(tempfile.mkdtemp(prefix="sd-secret-", dir=home if os.access(home, os.W_OK) else None))
    folder.chmod(0o700)
    path = folder / "token"
    value = f"SECRET-{marker()}"
    path.write_text(value)
    path.chmod(0o600)
    yield path, value
    path.unlink()
    folder.rmdir()


def test_a_private_file_cannot_be_read(where, secret):
    path, value = secret
    r = attack(
        f"""
        import os
        def through_the_folder():
            folder = os.open({str(path.parent)!r}, os.O_RDONLY)
            return os.read(os.open("token", os.O_RDONLY, dir_fd=folder), 100).decode()
        for how in (lambda: open({str(path)!r}).read(),
                    lambda: os.read(os.open({str(path)!r}, os.O_RDONLY), 100).decode(),
                    through_the_folder):
            try:
                print(how())
            except Exception as e:
                print(type(e).__name__)
        """,
        where,
    )
    assert value not in r.stdout + r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_trainers_folder_cannot_be_listed(where, episode):
    r = attack(f"import os\nprint(os.listdir({str(episode)!r}))", where)
    assert "episode.json" not in r.stdout


# Model code that, given a way to the guard's frames, rebinds whatever it can reach there that
# could hold the guard's policy (its folder, its refusals, strict mode), then writes outside.
TAMPER = '''
import os, sys, types

class Leak(dict):
    """Compared with a mappingproxy, this is handed the dict behind it."""
    leaked = []

    def __eq__(self, other):
        Leak.leaked.append(other)
        return False

    __hash__ = None


def opened(v):
    """What would open the guard if it held this value instead."""
    if type(v) is str and v.startswith("/"):
        return "/"  # its folder
    if type(v) is tuple and v and all(type(x) is str and x.startswith("/") for x in v):
        return ("/",)  # the folders it reads
    if type(v) in (frozenset, set, dict):
        return type(v)()  # its refusals, its write events
    if type(v) is bool:
        return False  # strict
    return v


def traceback_frames(e):
    """The frames an exception's traceback holds, outermost first."""
    tb, frames = e.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def tamper(frames):
    """Every global, closure cell, default, kwdefault and mappingproxy reachable from the guard's frames."""
    todo, seen = [], set()
    for f in frames:
        if f.f_code.co_filename == "<sandbox>":
            todo += [*f.f_locals.values(), *f.f_globals.values()]
            for name, value in list(f.f_globals.items()):
                f.f_globals[name] = opened(value)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if type(obj) is types.FunctionType:
            for cell in obj.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                    cell.cell_contents = opened(cell.cell_contents)
                except (ValueError, PermissionError):
                    pass
            try:
                todo += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
                obj.__defaults__ = tuple(opened(v) for v in obj.__defaults__ or ())
            except PermissionError as e:
                print("refused:", e)
            for name, value in list((obj.__kwdefaults__ or {}).items()):
                obj.__kwdefaults__[name] = opened(value)  # the dict itself: no audit event
        elif type(obj) is types.MappingProxyType:
            todo += list(obj.values())
            obj == Leak()
            for d in Leak.leaked:
                d.clear()
        elif type(obj) is dict:
            todo += list(obj.values())
        elif type(obj) in (tuple, list, frozenset):
            todo += list(obj)


def write_outside(path):
    for how in (lambda: open(path, "w").write("escaped"), lambda: os.mkdir(path + ".d")):
        try:
            how()
            print("WROTE OUTSIDE")
        except OSError as e:
            print("refused:", e)
'''

# How model code reaches the guard's frames. Each ends by calling tamper(frames), then write_outside(OUT).
REACH = {
    # The reported escape: a refusal's traceback holds the frames of the guard that raised it.
    "traceback_of_a_refusal": """
        try:
            open(OUT, "w")
        except PermissionError as e:
            tamper(traceback_frames(e))
        """,
    "inspect_trace": """
        import inspect
        try:
            os.mkdir(OUT)
        except PermissionError:
            tamper([info.frame for info in inspect.trace()])
        """,
    # An error (not a refusal) raised inside the guard, by an event the code raises itself.
    "error_inside_the_guard": """
        try:
            sys.audit("open", 1)
        except Exception as e:
            tamper(traceback_frames(e))
        """,
    # The code's own methods, called by the guard while it runs: sys._getframe() and f_back then
    # reach the running guard's frames.
    "called_back_by_the_guard": """
        def caught():
            frames, f = [], sys._getframe()
            while f is not None:
                frames.append(f)
                f = f.f_back
            tamper(frames)

        class Pid:  # os.kill's pid, compared with the sandbox's own
            def __ne__(self, other):
                caught()
                return False

            __eq__ = __ne__

        class Named(type):  # the type named in a refusal's message
            @property
            def __name__(cls):
                caught()
                return "Path"

        class Path(metaclass=Named):
            pass

        for event, args in (("os.kill", (Pid(), 0)), ("object.__setattr__", (None, Pid(), None)),
                            ("open", (Path(), "w", 0))):
            try:
                sys.audit(event, *args)
            except Exception:
                pass
        """,
}


@pytest.mark.parametrize("reach", list(REACH))
def test_the_guards_own_state_cannot_be_changed(reach):
    """At process level the guard is the last line: whatever of it the code reaches (its frames,
    functions, closures, defaults, globals), rebinding it leaves the guard refusing writes outside."""
    out = f"/tmp/{marker()}"
    code = TAMPER + f"OUT = {out!r}\n" + textwrap.dedent(REACH[reach]) + "write_outside(OUT)\n"
    try:
        r = run_python(code, LIMITS, level="process")
        assert "WROTE OUTSIDE" not in r.stdout, r.stdout + r.stderr
        assert r.stdout.count("refused: sandbox: ") >= 2, r.stdout + r.stderr  # both writes, by the guard
    finally:
        left = [p for p in (out, out + ".d") if os.path.lexists(p)]
        for p in left:
            os.rmdir(p) if os.path.isdir(p) else os.remove(p)
    assert left == []


def test_the_guard_keeps_no_cells():
    """A closure cell can be rebound by any code that reaches the function (cell_contents, no audit
    event): the hook and its rules take what they use as default arguments, a tuple that only an
    audited `__defaults__` assignment can replace, and the guard refuses that for its functions."""
    builders = (guard._path_functions, guard._file_rules, guard._import_rule, guard._audit_hook)
    todo = [*(b.__code__ for b in builders)]
    while todo:
        code = todo.pop()
        assert code.co_freevars == () and code.co_cellvars == (), f"{code.co_name} shares cells"
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]


def test_the_hook_holds_nothing_mutable():
    """Everything the hook reaches through its defaults is immutable: no dict, set, list or
    mappingproxy (whose dict a subclass's __eq__ is handed), and functions without cells. The one
    exception is the guard's module namespace, which tells the guard's functions apart (`is`)."""
    import posix

    paths = guard._path_functions(posix.lstat, posix.readlink, posix.getcwd, posix.access)
    on_files = guard._file_rules(paths, "/nowhere", ("/usr/lib",), ("/nowhere", "/usr/lib"))
    on_import = guard._import_rule(paths[0], paths[1], ("/usr/lib",), (".so",), True)
    hook = guard._audit_hook(on_files, on_import, os.getpid(), True)
    immutable = (str, bytes, int, bool, type(None), type, types.BuiltinFunctionType, types.MethodWrapperType)
    todo, seen = [hook], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            assert obj.__closure__ is None and obj.__kwdefaults__ is None, obj.__qualname__
            todo += obj.__defaults__ or ()
        elif type(obj) in (tuple, frozenset):
            todo += obj
        elif obj is vars(guard):
            pass
        else:
            assert type(obj) in immutable, f"the hook holds a {type(obj).__name__}: {obj!r}"
    assert len(seen) > 20


# Model code whose signal handler raises inside the guard: Python runs a handler between two
# bytecodes of whatever runs, the hook included, so where the hook took an exception to mean
# "no such file" (not a symlink, not a folder), an injected one made it allow what it refuses.
INJECT = '''
import os, signal, time

def handler(*a):
    raise FileNotFoundError(2, "injected")

def injected(call):
    """call() with SIGALRM going off at once, again and again, until it returns (or 2 s pass)."""
    signal.signal(signal.SIGALRM, handler)
    tries, start = 0, time.time()
    while time.time() - start < 2:
        tries += 1
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.00001 * (1 + tries % 50))
            return call()
        except OSError:
            pass
        finally:
            while True:
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    break
                except OSError:
                    pass
'''

INJECTED = {
    # The hook's "is it a folder outside?" treated an error as "no": a folder of /proc/self
    # opened, and its root/ link reached the whole file system through dir_fd.
    "folder_outside_then_dir_fd": """
        fd = injected(lambda: os.open("/proc/self", os.O_RDONLY))
        print("got a folder outside:", fd)
        if fd is not None:
            os.write(os.open("root" + OUT, os.O_WRONLY | os.O_CREAT, dir_fd=fd), b"escaped")
            print("WROTE OUTSIDE")
        """,
    # Its path resolution treated an error as "not a symlink": /proc/self/root/... stayed
    # inside /proc/self, which is readable, while the kernel follows it to /.
    "symlink_not_followed": """
        text = injected(lambda: open("/proc/self/root" + OUT).read())
        print("READ OUTSIDE" if text else "nothing read")
        """,
}


@pytest.mark.parametrize("how", list(INJECTED))
def test_an_exception_injected_into_the_guard_does_not_open_it(how):
    out = f"/tmp/{marker()}"
    if how == "symlink_not_followed":
        Path(out).write_text("outside")
        os.chmod(out, 0o644)
    code = INJECT + f"OUT = {out!r}\n" + textwrap.dedent(INJECTED[how])
    try:
        r = run_python(code, LIMITS, level="process")
        assert "WROTE OUTSIDE" not in r.stdout and "READ OUTSIDE" not in r.stdout, r.stdout + r.stderr
        if how == "folder_outside_then_dir_fd":
            assert not os.path.exists(out)
    finally:
        if os.path.exists(out):
            os.remove(out)
