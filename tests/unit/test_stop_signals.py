"""A signal while an episode is set up: rank 0 (or a lone process) says why; torchrun's other ranks stop quietly."""

from __future__ import annotations

import os
import signal

import pytest

from sdcli.core.errors import Interrupted, JobStopped
from sdcli.training.stop_signals import stop_at_once


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_setup_stops_at_once_with_a_message_on_rank_0(signum):
    with pytest.raises(Interrupted, match="while the episode was being set up") as stopped:
        with stop_at_once():
            os.kill(os.getpid(), signum)
    assert stopped.value.code == 128 + signum


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_other_ranks_stop_with_the_same_code_and_print_nothing(signum):
    with pytest.raises(JobStopped) as stopped:
        with stop_at_once(quiet=True):
            os.kill(os.getpid(), signum)
    assert stopped.value.code == 128 + signum
    assert stopped.value.render() is None  # the CLI prints nothing for it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
