"""`sd` in-process, for tests where a separate process is not the point.

`sd(*args)` runs the real app (`sdcli.cli.app`, whose `_Commands` maps exceptions to messages and
exit codes exactly as `sd` does) through Typer's `CliRunner`, and answers like
`subprocess.run(..., capture_output=True, text=True)`: `returncode`, `stdout`, `stderr`. A
subprocess pays 3-5 s of imports per call; this pays nothing. Tests of what only a real process
shows (the exit code `main()` gives, a signal, a kill, locks between processes, isolation) keep
a subprocess.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from sdcli.cli import app


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def sd(*args: str | Path, cwd: str | Path | None = None, env: dict[str, str] | None = None,
       input: str | None = None) -> Done:
    """Run `sd ARGS` in this process (in `cwd`, with `env` added to the environment meanwhile and
    `input` as its standard input)."""
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        result = CliRunner().invoke(app, [os.fspath(a) for a in args], prog_name="sd", env=env, input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # escaped the app's own mapping: a bug in the test or in sd, shown as one
    return Done(result.exit_code, result.stdout, result.stderr)
