"""Losses against plain references: torch.distributions, explicit sums, and the policy-gradient form."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from sdcli.losses import (
    DivergenceSpec,
    chunked_token_divergence,
    chunked_token_nll,
    masked_sequence_mean,
    packed_token_divergence,
    sft_token_nll,
    token_divergence,
)

B, T, V, H = 3, 7, 11, 5


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2


def test_forward_kl_matches_torch_distributions(logits):
    s, t = logits
    got = token_divergence(s, t, DivergenceSpec("forward_kl"))
    want = kl_divergence(Categorical(logits=t), Categorical(logits=s))
    assert got.shape == (B, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reverse_kl_matches_torch_distributions(logits):
    s, t = logits
    got = token_divergence(s, t, DivergenceSpec("reverse_kl"))
    want = kl_divergence(Categorical(logits=s), Categorical(logits=t))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_jsd_matches_explicit_mixture_and_ends_are_the_kls(logits):
    s, t = logits
    ps, pt = s.softmax(-1), t.softmax(-1)
    for alpha in (0.1, 0.5, 0.9):
        m = alpha * pt + (1 - alpha) * ps
        want = alpha * (pt * (pt.log() - m.log())).sum(-1) + (1 - alpha) * (ps * (ps.log() - m.log())).sum(-1)
        torch.testing.assert_close(token_divergence(s, t, DivergenceSpec("jsd", alpha=alpha)), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        token_divergence(s, t, DivergenceSpec("jsd", alpha=0.0)), token_divergence(s, t, DivergenceSpec("forward_kl"))
    )
    torch.testing.assert_close(
        token_divergence(s, t, DivergenceSpec("jsd", alpha=1.0)), token_divergence(s, t, DivergenceSpec("reverse_kl"))
    )


def test_divergences_are_zero_for_identical_roles(logits):
    s, _ = logits
    for div in ("forward_kl", "reverse_kl", "jsd"):
        for support in ("full", "topk"):
            got = token_divergence(s, s.clone(), DivergenceSpec(div, support=support, topk=4))
            assert got.abs().max() < 1e-5


def test_topk_with_tail_bucket_is_kl_over_k_plus_one_categories(logits):
    s, t = logits
    k = 4
    got = token_divergence(s, t, DivergenceSpec("forward_kl", support="topk", topk=k, tail_bucket=True))
    ps, pt = s.softmax(-1), t.softmax(-1)
    idx = ps.topk(k, -1).indices
    ps_k, pt_k = ps.gather(-1, idx), pt.gather(-1, idx)
    ps_k = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
    pt_k = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
    want = kl_divergence(Categorical(probs=pt_k), Categorical(probs=ps_k))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_topk_without_tail_renormalises(logits):
    s, t = logits
    k = 3
    got = token_divergence(s, t, DivergenceSpec("reverse_kl", support="topk", topk=k, tail_bucket=False))
    idx = s.topk(k, -1).indices
    want = kl_divergence(Categorical(logits=s.gather(-1, idx)), Categorical(logits=t.gather(-1, idx)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_topk_with_full_vocabulary_equals_full(logits):
    s, t = logits
    full = token_divergence(s, t, DivergenceSpec("forward_kl"))
    topk = token_divergence(s, t, DivergenceSpec("forward_kl", support="topk", topk=V, tail_bucket=False))
    torch.testing.assert_close(full, topk, rtol=1e-4, atol=1e-5)


def test_reverse_kl_gradient_is_the_policy_gradient_form():
    """grad KL(pi || q) = E_{y~pi}[(log pi(y) - log q(y)) grad log pi(y)] (the seed formula)."""
    torch.manual_seed(0)
    theta = torch.randn(1, 1, V, requires_grad=True)
    q_logits = torch.randn(1, 1, V)
    loss = token_divergence(theta, q_logits, DivergenceSpec("reverse_kl")).sum()
    (grad_loss,) = torch.autograd.grad(loss, theta)

    logpi = theta.log_softmax(-1)[0, 0]
    logq = q_logits.log_softmax(-1)[0, 0]
    want = torch.zeros(V)
    for y in range(V):
        (g,) = torch.autograd.grad(logpi[y], theta, retain_graph=True)
        want += logpi[y].exp().detach() * (logpi[y] - logq[y]).detach() * g[0, 0]
    torch.testing.assert_close(grad_loss[0, 0], want, rtol=1e-4, atol=1e-6)


def test_sampled_estimator_value_and_expected_gradient():
    torch.manual_seed(1)
    theta = torch.randn(1, 1, V, requires_grad=True)
    q_logits = torch.randn(1, 1, V)
    spec = DivergenceSpec("reverse_kl", support="sampled")
    pi = theta.softmax(-1)[0, 0].detach()
    expected_grad = torch.zeros(V)
    expected_value = 0.0
    for y in range(V):
        tokens = torch.tensor([[y]])
        value = token_divergence(theta, q_logits, spec, tokens).sum()
        (g,) = torch.autograd.grad(value, theta)
        expected_grad += pi[y] * g[0, 0]
        expected_value += pi[y] * value.item()
        want_value = theta.log_softmax(-1)[0, 0, y] - q_logits.log_softmax(-1)[0, 0, y]
        assert value.item() == pytest.approx(want_value.item(), abs=1e-5)
    full = token_divergence(theta, q_logits, DivergenceSpec("reverse_kl")).sum()
    (grad_full,) = torch.autograd.grad(full, theta)
    torch.testing.assert_close(expected_grad, grad_full[0, 0], rtol=1e-4, atol=1e-6)
    assert expected_value == pytest.approx(full.item(), abs=1e-5)


@pytest.mark.parametrize("spec", [
    DivergenceSpec("forward_kl"),
    DivergenceSpec("jsd", alpha=0.3, support="topk", topk=4),
    DivergenceSpec("reverse_kl", support="sampled"),
])
def test_chunked_equals_unchunked_in_value_and_gradient(spec):
    torch.manual_seed(2)
    head = torch.nn.Linear(H, V, bias=False)
    hs = torch.randn(B, T, H, requires_grad=True)
    ht = torch.randn(B, T, H)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)

    full = token_divergence(head(hs), head(ht), spec, tokens)
    (g_full,) = torch.autograd.grad(masked_sequence_mean(full, mask), hs)
    chunked = chunked_token_divergence(hs, ht, head, spec, tokens, chunk=3)
    (g_chunked,) = torch.autograd.grad(masked_sequence_mean(chunked, mask), hs)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-5, atol=1e-6)


def test_masked_sequence_mean_weights_each_sequence_equally():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # sequence means 2 and 2; the empty third sequence is left out
    assert masked_sequence_mean(per_token, mask).item() == pytest.approx(2.0)


def test_empty_mask_gives_attached_zero_not_nan():
    x = torch.randn(2, 3, requires_grad=True)
    loss = masked_sequence_mean(x * 2, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_chunked_nll_matches_cross_entropy():
    torch.manual_seed(3)
    head = torch.nn.Linear(H, V)
    h = torch.randn(B, T, H, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    want = torch.nn.functional.cross_entropy(head(h).reshape(-1, V), y.reshape(-1), reduction="none").reshape(B, T)
    torch.testing.assert_close(chunked_token_nll(h, head, y, chunk=2), want)
    torch.testing.assert_close(sft_token_nll(head(h), y), want)


def test_packed_equals_masked_chunked_in_value_and_gradient():
    torch.manual_seed(4)
    head = torch.nn.Linear(H, V, bias=False)
    hs = torch.randn(B, T, H, requires_grad=True)
    ht = torch.randn(B, T, H)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.4
    spec = DivergenceSpec("forward_kl")
    ref = chunked_token_divergence(hs, ht, head, spec, tokens, chunk=3) * mask
    (g_ref,) = torch.autograd.grad(masked_sequence_mean(ref, mask), hs)
    packed = packed_token_divergence(hs, ht, mask, head, spec, tokens, chunk=3)
    (g_packed,) = torch.autograd.grad(masked_sequence_mean(packed, mask), hs)
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_packed, g_ref, rtol=1e-5, atol=1e-6)
