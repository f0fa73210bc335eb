"""The learning-rate schedule: sd's factors, pinned; why it is not transformers.get_scheduler; resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdcli.training.setup import lr_lambda

# (schedule, warmup_steps, total_steps) -> the factor of steps 0 .. total_steps, as sd has always computed it
PINNED = {
    ("constant", 0, 6): [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    ("constant", 3, 6): [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0],
    ("cosine", 0, 4): [1.0, 0.8535534, 0.5, 0.1464466, 0.0],
    ("cosine", 2, 6): [0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0],
    ("linear", 0, 4): [1.0, 0.75, 0.5, 0.25, 0.0],
    ("linear", 2, 6): [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0],
}


def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _factors(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps + 1):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("key", list(PINNED))
def test_the_schedule_gives_the_pinned_factors(key):
    kind, warmup, total = key
    factor = lr_lambda(SimpleNamespace(lr_schedule=kind, warmup_steps=warmup), total)
    assert [factor(s) for s in range(total + 1)] == pytest.approx(PINNED[key], abs=1e-6)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_transformers_get_scheduler_agrees_without_warmup_and_not_with_it(kind):
    """The reason sd keeps its own lr_lambda: transformers' warm-up starts at factor 0 (the first step
    does not learn) and reaches each warm-up factor one step later; past warm-up the two agree.
    If transformers ever matches the pinned factors, this fails: then switch to get_scheduler."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    for warmup, total in ((0, 6), (2, 6)):
        optimizer = _optimizer()
        theirs = _factors(get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total), optimizer, total)
        ours = [lr_lambda(SimpleNamespace(lr_schedule=kind, warmup_steps=warmup), total)(s) for s in range(total + 1)]
        assert theirs[warmup:] == pytest.approx(ours[warmup:], abs=1e-6)
        if warmup:
            assert theirs[0] == 0.0 and ours[0] == pytest.approx(1 / warmup)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_a_resumed_schedule_continues_with_the_same_factors(kind):
    """LambdaLR's state_dict (what a checkpoint holds) puts the schedule back at its step."""
    cfg, total = SimpleNamespace(lr_schedule=kind, warmup_steps=2), 7
    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    whole = _factors(scheduler, optimizer, total)

    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    _factors(scheduler, optimizer, 2)  # steps 0-2 taken, then "interrupted"
    state = scheduler.state_dict(), optimizer.state_dict()
    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    optimizer.load_state_dict(state[1])
    scheduler.load_state_dict(state[0])
    assert _factors(scheduler, optimizer, total - 3) == pytest.approx(whole[3:], abs=1e-9)
