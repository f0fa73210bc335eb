"""Ctrl-C and SIGTERM during `sd train`: stop where nothing is lost.

SIGTERM is what a cluster scheduler, `docker stop` or torchrun sends before it kills a job, so it
is handled as Ctrl-C. While the episode is set up, nothing is trained yet and a signal stops at
once. During the training loop the first signal asks the loop to stop after the
current step (the checkpoint is then exactly the state between two steps, and a resumed run
matches an uninterrupted one); a second one stops at once. After the loop the adapter is saved
before the evaluation, which can take minutes where a scheduler's grace period is often 30 s: a
signal then ends the evaluation at once, and the episode is published without it.

Handlers are installed in the main thread only (Python allows no other); elsewhere the signals
keep their default behaviour.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from sdcli.core.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class EvaluationStopped(Exception):
    """Raised inside the evaluation after an episode by Ctrl-C or SIGTERM; the evaluation records
    it as its error, and the episode is kept without its scores."""


@dataclass
class AfterTraining:
    """What the signals did after the loop: `signal` (0: none) and whether one ended the evaluation."""

    signal: int = 0
    evaluating: bool = False
    cut_evaluation: bool = False


@contextmanager
def _handling(handler):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def stop_at_once():
    """For the episode's setup (the model loading, the anchors' answers, the teacher's answers):
    nothing is trained yet, so a signal stops at once with a message and 128 + its number, through
    every `with` on the way out (the run's lock is released, not left for the next run to take over)."""

    def handler(signum, frame):
        raise Interrupted(
            f"Stopped by {signal_name(signum)} while the episode was being set up, before its first step: nothing "
            "was trained. The same command starts it again.",
            code=128 + signum,
        )

    with _handling(handler):
        yield


@contextmanager
def stop_after_step():
    """For the training loop. Yields a function that returns the signal asked for (0: none)."""
    requested = {"signal": 0}

    def handler(signum, frame):
        if requested["signal"]:
            raise KeyboardInterrupt
        requested["signal"] = signum
        print(f"\nStopping after this step ({signal_name(signum)}; Ctrl-C again to stop at once, losing it)...",
              flush=True)

    with _handling(handler):
        yield lambda: requested["signal"]


@contextmanager
def stop_evaluation(asked: int = 0):
    """For what follows the loop: saving, evaluating, publishing. Yields an AfterTraining; while its
    `evaluating` is set, the first signal raises EvaluationStopped, and at any other time it is
    recorded for the caller to stop after publishing (a second signal is ignored: what is left is
    a few file writes and a rename). asked: a signal the loop received in its last step."""
    state = AfterTraining(signal=asked)

    def handler(signum, frame):
        if state.signal:
            return
        state.signal = signum
        if state.evaluating:
            state.cut_evaluation = True
            raise EvaluationStopped(f"stopped by {signal_name(signum)}")
        print(f"\nStopping once the episode is saved ({signal_name(signum)})...", flush=True)

    with _handling(handler):
        yield state
