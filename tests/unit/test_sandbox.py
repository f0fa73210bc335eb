"""The sandbox contains what model-written code can do wrong, and the test process survives it.

Each hostile program must come back as a failing result, quickly. Where a test turns the
Python-level guard off (`guards=False`), it checks what the process-level isolation holds on its
own, and only where `SandboxResult.isolation` says that isolation took effect on this machine.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from sdcli.config import SandboxLimits
from sdcli.sandbox import run_python

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs Linux or macOS")

SMALL = SandboxLimits(wall_seconds=3, cpu_seconds=1, memory_mb=128, output_bytes=4096, max_processes=4)


def run(code: str, limits: SandboxLimits = SMALL, **kw):
    return run_python(textwrap.dedent(code), limits, **kw)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_runs_code_and_captures_both_streams():
    r = run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (r.returncode, r.stdout, r.stderr, r.killed_reason, r.timed_out) == (3, "out\n", "err\n", None, False)
    assert not r.ok and run("pass").ok


def test_fresh_folder_is_home_and_tmp_and_is_deleted(tmp_path):
    r = run(
        """
        import os, tempfile
        open("scratch.txt", "w").write("fine")
        print(os.getcwd()); print(os.environ["HOME"]); print(tempfile.gettempdir())
        """
    )
    assert r.ok, r.stderr
    cwd, home, tmp = r.stdout.split()
    assert Path(cwd).name.startswith("sd-sandbox-") and home == cwd and Path(tmp).resolve() == Path(cwd).resolve()
    assert not Path(cwd).exists()


def test_files_and_args_are_passed():
    r = run("import sys\nprint(open('data.txt').read(), sys.argv[1:])", files={"data.txt": "hello"}, args=["a", "b"])
    assert r.stdout == "hello ['a', 'b']\n"


def test_errors_show_a_traceback_from_main_py():
    r = run("def f(:\n    pass")
    assert r.returncode == 1 and 'File "main.py", line 1' in r.stderr and "SyntaxError" in r.stderr


def test_infinite_loop_hits_the_cpu_limit():
    r = run("while True:\n    pass", SMALL.model_copy(update={"wall_seconds": 10}))
    assert r.killed_reason == "cpu_time" and not r.ok
    assert r.duration < 5


def test_sleeping_forever_hits_the_wall_clock_limit():
    start = time.monotonic()
    r = run("import time\ntime.sleep(60)", SMALL.model_copy(update={"wall_seconds": 0.5}))
    assert r.timed_out and r.killed_reason == "wall_time" and r.returncode < 0
    assert time.monotonic() - start < 3


def test_memory_bomb_hits_the_memory_limit():
    r = run("chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))")
    assert r.killed_reason == "memory" and "MemoryError" in r.stderr


def test_huge_print_is_cut_and_the_child_killed():
    r = run("while True:\n    print('x' * 10000)")
    assert r.killed_reason == "output_limit" and not r.ok
    assert len(r.stdout) + len(r.stderr) < SMALL.output_bytes + 200
    assert "output truncated" in r.stdout


def test_fork_bomb_is_refused_by_the_guard():
    r = run("import os\nwhile True:\n    os.fork()")
    assert r.returncode == 1 and "PermissionError" in r.stderr and "not allowed" in r.stderr


def test_subprocess_and_multiprocessing_are_refused():
    r = run("import subprocess\nsubprocess.run(['echo', 'hi'])")
    assert r.returncode == 1 and "PermissionError" in r.stderr
    r = run("import multiprocessing as mp\np = mp.Process(target=print)\np.start(); p.join()")
    assert r.returncode == 1 and "PermissionError" in r.stderr


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
        print("child", os.getpid(), flush=True)
"""


def test_fork_bomb_without_the_guard_is_bounded_and_fully_killed():
    limits = SMALL.model_copy(update={"wall_seconds": 1.0, "cpu_seconds": 5})
    r = run(FORK_BOMB, limits, guards=False)
    if "process_count" not in r.isolation and "process_count_shared_with_user" not in r.isolation:
        pytest.skip(f"no kernel process limit here: {r.notes}")
    assert r.timed_out
    pids = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("child")]
    assert 1 <= len(pids) <= limits.max_processes - 1
    time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "a sandboxed process survived the run"


def test_write_outside_the_folder_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run(f"open({str(target)!r}, 'w').write('x')")
    assert r.returncode == 1 and "PermissionError" in r.stderr
    r = run(f"import os\nos.remove({str(tmp_path)!r})")
    assert r.returncode == 1 and "PermissionError" in r.stderr
    assert not target.exists()


def test_write_outside_without_the_guard_is_blocked_by_the_uid(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run(f"open({str(target)!r}, 'w').write('x')", guards=False)
    if "separate_uid" not in r.isolation:
        pytest.skip("the child does not run under a separate uid here (not root, or not Linux)")
    assert r.returncode == 1 and "Permission denied" in r.stderr
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


def test_network_is_refused_by_the_guard(listener):
    r = run(CONNECT.format(port=listener.getsockname()[1]))
    assert r.returncode == 1 and "PermissionError" in r.stderr and "connected" not in r.stdout
    assert_never_connected(listener)


def test_network_without_the_guard_is_unreachable(listener):
    r = run(CONNECT.format(port=listener.getsockname()[1]), guards=False)
    if "network_namespace" not in r.isolation:
        pytest.skip(f"no network namespace here: {r.notes}")
    assert r.returncode == 1 and "OSError" in r.stderr and "connected" not in r.stdout
    assert_never_connected(listener)


def test_reports_what_took_effect():
    r = run("pass")
    assert {"cpu_time", "file_size"} <= set(r.isolation) or os.uname().sysname != "Linux"
    assert isinstance(r.notes, list)
