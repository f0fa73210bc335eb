"""Scorers for the signal benchmarks' held-out sets (eval `reward: benchmarks.signals.scorers:NAME`).

`passes_tests`: the greedy answer's code run against the line's tests by sd's own `python_tests`
environment (in sd's sandbox, the same one training uses); 1 when every test passes, else 0, so
the set's score is a pass rate. The spec resolves from the repository root (the runner's working
folder), where `benchmarks` is a namespace package.

`words`: the length of a response in words, which the interactions benchmark reads.
"""

from __future__ import annotations

from sdcli.recipe.signal_sections import SandboxLimits
from sdcli.verification.python_tests import python_tests

# the training recipe's limits: a held-out answer gets what a training sample gets
LIMITS = SandboxLimits(wall_seconds=10, cpu_seconds=5, memory_mb=512)


def passes_tests(response: str, example: dict) -> float:
    reward, _feedback = python_tests(response, example, limits=LIMITS)
    return 1.0 if reward >= 1.0 else 0.0


def words(response: str) -> int:
    return len(response.split())
