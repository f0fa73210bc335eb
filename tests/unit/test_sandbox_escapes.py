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
    """The hook and the rules it calls read only their closures, never a global or a builtin at
    call time (the code under test could replace those), however the guard is split into helpers."""
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
