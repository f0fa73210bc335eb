"""Shared by the sandbox tests: the isolation levels to test, finding survivors, and a normal user.

`level` is a fixture over the two isolation levels; "bubblewrap" is skipped, with the reason,
where bwrap is not usable (CI prints skips with -rs). `run_tests_as_normal_user` runs test files
again as an unprivileged user, which only root can arrange; elsewhere it skips and says why.

`missing_isolation(reason)` is how a test of a kernel isolation feature (bubblewrap, a process
limit, a uid of its own, a network namespace) says the machine lacks it: a skip with the reason,
or, where SD_REQUIRE_ISOLATION=1 (set it on the machine that will run model code), a failure, so that a run cannot pass without
having checked them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import site
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sdcli.verification.sandbox import isolation

REPO = Path(__file__).resolve().parent.parent
TEST_USER = "sd-sandbox-test"
REQUIRE_ISOLATION = "SD_REQUIRE_ISOLATION"


def missing_isolation(reason: str) -> None:
    """Skip with `reason` (pytest -rs prints it), or fail where SD_REQUIRE_ISOLATION=1."""
    if os.environ.get(REQUIRE_ISOLATION) == "1":
        pytest.fail(f"{REQUIRE_ISOLATION}=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=["bubblewrap", "process"])
def level(request) -> str:
    if request.param == "bubblewrap" and isolation().level != "bubblewrap":
        missing_isolation(f"bubblewrap is not usable here ({isolation().why}); apt-get install bubblewrap to test it")
    return request.param


def marker() -> str:
    return f"sd-marker-{uuid.uuid4().hex}"


def survivors(mark: str) -> list[int]:
    """Live processes (in any pid namespace) whose command line contains `mark`; zombies do not count."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if mark.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                found.append(int(pid))
        except OSError:
            pass
    return found


def run_tests_as_normal_user(test_files: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pytest on `test_files` as an unprivileged user; skip (with the reason) where that cannot be arranged.

    Needs root (to create the user with useradd, once) on Linux. The Python running these tests
    may live where that user cannot read it (e.g. /root/.pyenv): then the run happens in a
    private mount namespace where the installation is bind-mounted at a readable path, which
    changes nothing outside that namespace. (A build that finds its libpython through an
    absolute path into the unreadable folder then loads the system's libpython of the same
    version, if there is one: Debian's, with _posixsubprocess built in, which the guard must
    then refuse as a builtin. The run is still a normal user's.)
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        missing_isolation("running the sandbox as a normal user needs these tests to run as root (to create one)")
    for tool in ("useradd", "unshare", "mount", "setpriv"):
        if shutil.which(tool) is None:
            missing_isolation(f"running the sandbox as a normal user needs `{tool}` (util-linux / passwd)")
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER]
        subprocess.run(useradd, check=True)
        user = pwd.getpwnam(TEST_USER)
    prefix, exe = Path(sys.prefix).resolve(), Path(sys.executable).resolve()
    packages = [Path(p).resolve() for p in site.getsitepackages() if Path(p).is_dir()]

    def drop(python: Path, at: Path) -> str:
        path = ":".join([str(REPO), *(str(at / p.relative_to(prefix)) for p in packages if p.is_relative_to(prefix))])
        return (
            f"exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} --clear-groups --inh-caps=-all "
            f"--bounding-set=-all env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 PYTHONPATH={path} "
            f"OMP_NUM_THREADS=1 {python} -m pytest -rs -p no:cacheprovider "
            + " ".join(str(REPO / f) for f in test_files)
        )

    if _others_can_enter(prefix) and _others_can_enter(exe.parent):
        command = ["sh", "-c", drop(exe, prefix)]
        return subprocess.run(command, cwd="/tmp", capture_output=True, text=True, timeout=timeout)
    if not exe.is_relative_to(prefix):
        missing_isolation(f"{exe} is outside {prefix} and other users cannot read it: no way to run it as a normal user")
    mount = Path(f"/tmp/sd-user-python-{uuid.uuid4().hex[:8]}")
    mount.mkdir(mode=0o755)
    try:
        inner = f"mount --bind {prefix} {mount} && {drop(mount / exe.relative_to(prefix), mount)}"
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
        return subprocess.run(command, cwd="/tmp", capture_output=True, text=True, timeout=timeout)
    finally:
        mount.rmdir()


def _others_can_enter(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in [path, *path.parents])
