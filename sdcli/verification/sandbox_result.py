"""What a sandboxed run comes back as, `SandboxResult`, and how it is read from the finished child:
its output, what it reported on its status pipe, and which limit ended it."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field

from sdcli.recipe.signal_sections import SandboxLimits

TRUNCATED = "\n[... output truncated: the sandbox keeps at most {n} bytes ...]\n"


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


def read_status(fd: int) -> tuple[list[str], list[str]]:
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


def decode_output(data: bytearray, cap: int, truncated: bool) -> str:
    text = data.decode("utf-8", errors="replace")
    return text + TRUNCATED.format(n=cap) if truncated else text


def diagnose(returncode: int, cpu_used: float | None, stderr: str, limits: SandboxLimits) -> str | None:
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
