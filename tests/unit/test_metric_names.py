"""Metric names: namespaced, the divergence under its true name, and old run folders still read."""

from __future__ import annotations

import math

import pytest
import torch

from sdcli.core.metric_names import RENAMED, current_names
from sdcli.training.metrics import divergence_metrics


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_the_divergence_is_logged_under_its_own_name(divergence):
    per_token = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    got = divergence_metrics(per_token, mask, divergence)
    assert got == {"loss/divergence": 2.0, f"loss/{divergence}": 2.0}  # the masked token does not count
    assert "kl" not in got


def test_sft_has_no_divergence():
    got = divergence_metrics(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), None)
    assert list(got) == ["loss/divergence"] and math.isnan(got["loss/divergence"])


def test_old_names_are_read_as_todays():
    old = {"step": 3, "loss": 1.5, "kl": 0.25, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 9.0, "learn/disagreement": 0.1}
    assert current_names(old) == {"step": 3, "loss/total": 1.5, "loss/divergence": 0.25, "optim/lr": 1e-4,
                                  "optim/grad_norm": 2.0, "speed/tokens_per_s": 9.0, "learn/disagreement": 0.1}
    new = {"loss/total": 1.0, "loss/divergence": 0.5, "loss/jsd": 0.5}
    assert current_names(new) == new
    assert current_names({"loss": 9.0, "loss/total": 1.0}) == {"loss/total": 1.0}  # today's name wins
    assert all("/" in name for name in RENAMED.values())


def test_a_training_log_line_has_no_unnamespaced_keys():
    """The names the loop writes (a real step of sdcli.training.metrics.step_metrics)."""
    from types import SimpleNamespace

    from sdcli.training.metrics import PhaseTimer, step_metrics
    from sdcli.training.step import StepLoss

    class Memory:  # PeakMemory's interface
        device = torch.device("cpu")
        peaks_mb = {"student": 12.0}

        def start(self):
            pass

        def stop(self, name):
            pass

    timer = PhaseTimer(Memory())
    with timer("student"):
        pass
    per_token, mask = torch.tensor([[0.5, 1.5]]), torch.tensor([[True, True]])
    rollout = SimpleNamespace(seqs=[SimpleNamespace(response=[1, 2])], generated=2, kinds=torch.tensor([0]),
                              views=[], teacher_cut={})
    line = step_metrics(step=1, total_steps=2, out=StepLoss(torch.tensor(1.0), per_token, None, mask), rollout=rollout,
                        divergence="reverse_kl", lr=0.1, grad_norm=0.3, update=0, timer=timer, step_seconds=1.0)
    assert {k for k in line if "/" not in k} == {"step", "steps_total"}
    assert line["loss/total"] == 1.0 and line["loss/reverse_kl"] == line["loss/divergence"] == 1.0
    assert "loss/forward_kl" not in line and line["optim/lr"] == 0.1 and line["speed/tokens_per_s"] == 2.0
