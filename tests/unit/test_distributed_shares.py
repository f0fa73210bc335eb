"""Data parallel shares of a step (sdcli.training.distributed), without a process group: which examples each
rank takes, which of them go off-policy, and that one process gets everything unchanged."""

from __future__ import annotations

import pytest
import torch

from sdcli.training.distributed import Ranks, share_bounds, stack_padded
from sdcli.training.batch import ExampleSampler, off_policy_count


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n,per_step", [(5, 3), (7, 4), (8, 2), (3, 5), (10, 1)])
def test_every_example_once_per_pass_and_no_rank_takes_one_twice(world, n, per_step):
    """Every rank draws the same global batch from its own sampler and keeps its contiguous share:
    over a pass, the ranks together take each example exactly once, and never the same one."""
    samplers = [ExampleSampler(n, seed=3, shuffle=True) for _ in range(world)]
    reference = ExampleSampler(n, seed=3, shuffle=True)  # one process
    taken: list[list[int]] = [[] for _ in range(world)]
    one_process: list[int] = []
    steps = 3 * n  # several passes, batches crossing their ends
    for _ in range(steps):
        one_process += reference.take(per_step)
        shares = [Ranks(rank=r, world=world).split(samplers[r].take(per_step)) for r in range(world)]
        assert sum(shares, []) == one_process[-per_step:]  # in order: the global batch, cut in pieces
        for r, share in enumerate(shares):
            assert len(share) in (per_step // world, -(-per_step // world))  # balanced
            taken[r] += share
    # the global sequence of examples is that of one process, so each pass uses each example once,
    # and each pick names its pass (an off-policy visit's response depends on it)
    for start in range(0, steps * per_step - n + 1, n):
        assert sorted(index for index, _ in one_process[start : start + n]) == list(range(n))
        assert {epoch for _, epoch in one_process[start : start + n]} == {start // n}
    assert sum(len(t) for t in taken) == steps * per_step


def test_share_bounds_cover_the_batch_in_order():
    for n in range(0, 12):
        for world in range(1, 6):
            bounds = [share_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_off_policy_prompts_are_the_ones_one_process_picks(world, fraction):
    """One process sends the first n_off examples that carry a demonstration off-policy; each rank
    must send exactly those in its share, whatever the shares."""
    carries = [True, False, True, True, False, True, True]  # which examples of the batch have one
    batch = list(range(len(carries)))
    for rollout in range(5):
        n_off = off_policy_count(fraction, len(batch), rollout)
        globally_off = [i for i in batch if carries[i]][:n_off]
        picked = []
        for r in range(world):
            share, n_off_r = Ranks(rank=r, world=world).share_of_batch(batch, n_off, lambda i: carries[i])
            picked += [i for i in share if carries[i]][:n_off_r]
        assert picked == globally_off


def test_one_process_gets_everything_unchanged_and_no_group_is_made():
    one = Ranks()
    batch = [object() for _ in range(5)]
    assert one.split(batch) is batch
    calls = []
    assert one.share_of_batch(batch, 2, lambda ex: calls.append(ex)) == (batch, 2) and calls == []
    assert one.exchange("x") == ["x"] and one.from_main(7) == 7 and one.totals(3, 4) == (3, 4)
    assert one.any_rank(True) is True and one.device is None
    extra = {"recipe": "r"}
    assert one.with_rank_rng(extra) is extra
    with one.one_job():
        pass
    assert not torch.distributed.is_initialized()


def test_rank_streams_differ_and_repeat():
    draws = {}
    for rank in (0, 1):
        Ranks(rank=rank, world=2).seed_sampling(5)
        draws[rank] = torch.rand(3)
    Ranks(rank=1, world=2).seed_sampling(5)
    assert torch.equal(torch.rand(3), draws[1])
    assert not torch.equal(draws[0], draws[1])


def test_stack_padded_pads_every_share_to_the_longest():
    a, b = torch.ones(2, 3), torch.full((1, 5), 2.0)
    out = stack_padded([a, None, b])
    assert out.shape == (3, 5)
    assert out[:2, :3].eq(1).all() and out[:2, 3:].eq(0).all() and out[2].eq(2).all()
    mask = stack_padded([torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], False)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert stack_padded([None, None]) is None
