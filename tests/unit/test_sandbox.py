"""The sandbox contains what model-written code can do wrong, and the test process survives it.

Each hostile program must come back as a failing result, quickly. Most tests run at both
isolation levels (`level`: bubblewrap, where usable, and process). Where a test turns the
Python-level guard off (`guards=False`), it checks what the kernel-level isolation holds on its
own. The escapes reported against the old sandbox are in test_sandbox_escapes.py.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest
from sandbox_helpers import level, marker, missing_isolation, survivors  # noqa: F401  (level is a fixture)

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.sandbox import Isolation, isolation, run_python
from sdcli.verification.sandbox_bubblewrap import INSIDE

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")

SMALL = SandboxLimits(wall_seconds=3, cpu_seconds=1, memory_mb=128, output_bytes=4096, max_processes=4)


def run(code: str, level: str, limits: SandboxLimits = SMALL, **kw):
    return run_python(textwrap.dedent(code), limits, level=level, **kw)


def test_runs_code_and_captures_both_streams(level):
    r = run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", level)
    assert (r.returncode, r.stdout, r.stderr, r.killed_reason, r.timed_out) == (3, "out\n", "err\n", None, False)
    assert not r.ok and run("pass", level).ok


def test_fresh_folder_is_home_and_tmp_and_is_gone_afterwards(level):
    r = run(
        """
        import os, tempfile
        open("scratch.txt", "w").write("fine")
        open("/tmp/also-fine.txt", "w").write("fine") if os.path.islink("/tmp") else None
        print(os.getcwd()); print(os.environ["HOME"]); print(tempfile.gettempdir())
        """,
        level,
    )
    assert r.ok, r.stderr
    cwd, home, tmp = r.stdout.split()
    assert home == cwd  # the `or` used to cover this too, so a wrong HOME passed whenever tmp was /tmp
    assert Path(tmp).resolve() == Path(cwd).resolve()  # TMPDIR is that folder (and /tmp links there in bubblewrap)
    if level == "bubblewrap":
        assert cwd == INSIDE  # a tmpfs of the sandbox's own, gone with its mount namespace
    else:
        assert Path(cwd).name.startswith("sd-sandbox-") and not Path(cwd).exists()


def test_files_args_and_stdin_are_passed(level):
    r = run(
        "import sys\nprint(open('data.txt').read(), sys.argv[1:], sys.stdin.read())",
        level,
        files={"data.txt": "hello"},
        args=["a", "b"],
        stdin=b"piped",
    )
    assert r.stdout == "hello ['a', 'b'] piped\n", r.stderr


def test_passed_fds_reach_the_child_and_are_closed_here(level):
    read_fd, write_fd = os.pipe()
    pipe = os.fstat(write_fd)
    r = run(f"import os\nos.write({write_fd}, b'through the pipe')", level, pass_fds=[write_fd])
    assert r.ok, r.stderr
    # handed over: closed in this process (another thread may already have reused the number)
    try:
        now = os.fstat(write_fd)
    except OSError:
        now = None
    assert now is None or (now.st_dev, now.st_ino) != (pipe.st_dev, pipe.st_ino)
    assert os.read(read_fd, 100) == b"through the pipe"
    os.close(read_fd)


def test_errors_show_a_traceback_from_main_py_without_the_guard(level):
    r = run("def f(:\n    pass", level)
    assert r.returncode == 1 and 'File "main.py", line 1' in r.stderr and "SyntaxError" in r.stderr
    r = run("open('/etc/passwd-not-here', 'w')", level)
    assert "PermissionError: sandbox:" in r.stderr and "<sandbox>" not in r.stderr and "in hook" not in r.stderr


def test_infinite_loop_hits_the_cpu_limit(level):
    r = run("while True:\n    pass", level, SMALL.model_copy(update={"wall_seconds": 10}))
    assert r.killed_reason == "cpu_time" and not r.ok
    assert r.duration < 5


def test_sleeping_forever_hits_the_wall_clock_limit(level):
    start = time.monotonic()
    r = run("import time\ntime.sleep(60)", level, SMALL.model_copy(update={"wall_seconds": 0.5}))
    assert r.timed_out and r.killed_reason == "wall_time" and r.returncode < 0
    assert time.monotonic() - start < 3


def test_memory_bomb_hits_the_memory_limit(level):
    r = run("chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))", level)
    assert r.killed_reason == "memory" and "MemoryError" in r.stderr


def test_huge_print_is_cut_and_the_child_killed(level):
    r = run("while True:\n    print('x' * 10000)", level)
    assert r.killed_reason == "output_limit" and not r.ok
    assert len(r.stdout) + len(r.stderr) < SMALL.output_bytes + 200
    assert "output truncated" in r.stdout


def test_fork_bomb_is_refused_by_the_guard(level):
    r = run("import os\nwhile True:\n    os.fork()", level)
    assert r.returncode == 1 and "PermissionError" in r.stderr and "not allowed" in r.stderr


def test_subprocess_and_multiprocessing_are_refused(level):
    r = run("import subprocess\nsubprocess.run(['echo', 'hi'])", level)
    assert r.returncode == 1 and "sandbox: the module _posixsubprocess is not allowed" in r.stderr
    r = run("import multiprocessing as mp\np = mp.Process(target=print)\np.start(); p.join()", level)
    assert r.returncode == 1 and "sandbox: " in r.stderr and "not allowed" in r.stderr


def test_refused_native_modules_leave_the_standard_librarys_fallbacks_working(level):
    r = run("import hashlib, dbm\nprint(hashlib.sha256(b'x').hexdigest()[:8])", level)
    assert r.stdout == "2d711642\n", r.stderr
    r = run("import tkinter\ntkinter.Tcl().eval('exec true')", level)
    assert r.returncode == 1 and "sandbox: the module _tkinter is not allowed" in r.stderr
    r = run("import sqlite3\nprint(sqlite3.connect(':memory:').execute('select 2').fetchone())", level)
    if level == "bubblewrap":
        assert r.stdout == "(2,)\n", r.stderr
    else:  # ATTACH DATABASE writes files natively: with no kernel boundary, no sqlite3
        assert "sandbox: the module _sqlite3 is not allowed" in r.stderr


def test_compiled_packages_load_only_behind_bubblewrap(level):
    pytest.importorskip("numpy")
    r = run("import numpy\nprint(numpy.arange(4).sum())", level, SMALL.model_copy(update={"memory_mb": 512}))
    if "No module named 'numpy'" in r.stderr:
        pytest.skip("numpy is installed, but not where the sandbox's `python -I` looks for packages")
    if level == "bubblewrap":
        assert r.stdout == "6\n", r.stderr
    else:  # a compiled package does file and process work in C, which the guard cannot see
        assert "only native modules of the standard library may load here" in r.stderr


FORK_BOMB = """
import os, sys, time
while True:
    try:
        pid = os.fork()
    except OSError:
        time.sleep(0.05)
        continue
    if pid == 0:
        os.setsid()  # try to escape the process group, too
        print("child", flush=True)
"""


def test_fork_bomb_without_the_guard_is_bounded_and_fully_killed(level):
    limits = SMALL.model_copy(update={"wall_seconds": 1.0, "cpu_seconds": 5})
    mark = marker()
    r = run(FORK_BOMB, level, limits, guards=False, args=[mark])
    if "process_count" not in r.isolation and "process_count_shared_with_user" not in r.isolation:
        missing_isolation(f"no kernel process limit at this level here: {r.isolation} {r.notes}")
    assert r.timed_out
    children = r.stdout.count("child")
    if "process_count" in r.isolation:  # the sandbox's own budget, not one shared with the user
        assert 1 <= children <= limits.max_processes - 1
    time.sleep(0.2)
    assert survivors(mark) == [], "a sandboxed process survived the run"


def test_write_outside_the_folder_is_blocked(level, tmp_path):
    target = tmp_path / "escaped.txt"
    # Inside bubblewrap /tmp is the sandbox's own folder, so the path may just not exist there.
    refused = ("PermissionError", "FileNotFoundError")
    r = run(f"open({str(target)!r}, 'w').write('x')", level)
    assert r.returncode == 1 and any(e in r.stderr for e in refused)
    r = run(f"import os\nos.rmdir({str(tmp_path)!r})", level)
    assert r.returncode == 1 and any(e in r.stderr for e in refused)
    assert not target.exists() and tmp_path.exists()


def test_write_outside_without_the_guard_is_blocked_by_the_kernel(level, tmp_path):
    target = tmp_path / "escaped.txt"
    if level == "bubblewrap":
        tmp_path.chmod(0o777)  # even where everyone may write (a fresh uid could write here at process level)
    r = run(f"open({str(target)!r}, 'w').write('x')", level, guards=False)
    if level == "process" and "separate_uid" not in r.isolation:
        missing_isolation("at process level as a normal user only the Python guard protects your files (see the README)")
    assert r.returncode == 1 and ("No such file" in r.stderr or "Permission denied" in r.stderr), r.stderr
    assert not target.exists()


@pytest.fixture()
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


def assert_never_connected(server):
    with pytest.raises(BlockingIOError):
        server.accept()


CONNECT = "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\nprint('connected')"


def test_network_is_refused_by_the_guard(level, listener):
    r = run(CONNECT.format(port=listener.getsockname()[1]), level)
    assert r.returncode == 1 and "PermissionError" in r.stderr and "connected" not in r.stdout
    assert_never_connected(listener)


def test_network_without_the_guard_is_unreachable(level, listener):
    r = run(CONNECT.format(port=listener.getsockname()[1]), level, guards=False)
    if "network_namespace" not in r.isolation:
        missing_isolation(f"no network namespace here: {r.notes}")
    assert r.returncode == 1 and "Error" in r.stderr and "connected" not in r.stdout
    assert_never_connected(listener)


def test_reports_what_took_effect(level):
    r = run("pass", level)
    if os.uname().sysname == "Linux":
        assert {"cpu_time", "memory", "file_size"} <= set(r.isolation)
    if level == "bubblewrap":
        assert {"bubblewrap", "pid_namespace", "mount_namespace", "process_count"} <= set(r.isolation)
        assert ("separate_uid" in r.isolation) == (os.geteuid() == 0)
        assert "reads_all_files" not in r.isolation
    assert isinstance(r.notes, list)


def test_the_level_is_chosen_once_and_described():
    level = isolation()
    assert level.level in ("bubblewrap", "process")
    assert level.describe()
    assert "Install bubblewrap" in Isolation("process", False, "bwrap is not installed").describe()
    assert "fresh unprivileged uid" in Isolation("bubblewrap", True).describe()
    as_root = Isolation("process", True, "bwrap is not installed", ("separate_uid", "pid_namespace"))
    assert "fresh unprivileged uid, in its own pid and network namespaces" in as_root.describe()
    assert "every file" in Isolation("process", True, "x", ("separate_uid", "reads_all_files")).describe()
    assert "runs as root" in Isolation("process", True, "x", ()).describe()
    assert "your files" in Isolation("process", False, "x", ()).describe()
    if os.uname().sysname == "Linux" and level.level == "process":
        assert level.why  # says why bubblewrap was not used


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="level must be one of"):
        run_python("pass", SMALL, level="docker")


def test_a_missing_isolation_feature_skips_with_its_reason_or_fails_where_required(monkeypatch):
    monkeypatch.delenv("SD_REQUIRE_ISOLATION", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no network namespace here"):
        missing_isolation("no network namespace here")
    monkeypatch.setenv("SD_REQUIRE_ISOLATION", "1")
    with pytest.raises(pytest.fail.Exception, match="SD_REQUIRE_ISOLATION=1, but no network namespace here"):
        missing_isolation("no network namespace here")


def test_the_process_level_says_what_python_3_13_gives_up(monkeypatch):
    """On 3.13+ frame.f_locals is writable without an audit event, so the guard's own variables are
    within reach of code that runs inside it; `sd validate` says so at the process level only."""
    import sdcli.verification.sandbox as sandbox

    process = Isolation("process", False, "bwrap is not installed")
    monkeypatch.setattr(sandbox.sys, "version_info", (3, 12, 7))
    assert "3.13" not in process.describe()
    monkeypatch.setattr(sandbox.sys, "version_info", (3, 13, 0))
    assert "3.13 or later" in process.describe() and "Install bubblewrap" in process.describe()
    assert "3.13" not in Isolation("bubblewrap", False).describe()
