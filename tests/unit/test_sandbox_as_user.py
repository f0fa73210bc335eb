"""The sandbox tests again, run by a normal (non-root) user, as most people run sd.

As root the sandbox has a fresh uid to hand the code; a normal user has only their own, which
is what the reported escapes exploited (the user's episode overwritten, the trainer signalled).
This runs the sandbox, escape and forgery tests as an unprivileged user created for the purpose
(root only; elsewhere it skips and says why, or fails where SD_REQUIRE_ISOLATION=1) and requires them all to pass there too.
"""

from __future__ import annotations

import re
import warnings

from sandbox_helpers import run_tests_as_normal_user

FILES = ["tests/unit/test_sandbox.py", "tests/unit/test_sandbox_escapes.py", "tests/unit/test_python_tests_forgery.py"]


def test_the_sandbox_tests_pass_as_a_normal_user():
    run = run_tests_as_normal_user(FILES)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[:8000]
    assert re.search(r"\d+ passed", output), output[-2000:]
    print(output[-3000:])  # the user run's own summary, skips and their reasons included (-rs)
    # what the user run skipped passes here too, so it is said where this run's summary shows it
    for reason in re.findall(r"^SKIPPED \[\d+\] (.+)$", output, re.MULTILINE):
        warnings.warn(f"as a normal user, skipped: {reason}", stacklevel=1)
