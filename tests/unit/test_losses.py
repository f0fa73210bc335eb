"""Losses against plain references: torch.distributions, explicit sums, and the policy-gradient form."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from sdcli.training.losses import (
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


def _reference_topk(s, t, index, divergence, tail):
    """KL over the categories `index` (+ 1 - their mass) with torch.distributions."""
    ps, pt = s.softmax(-1), t.softmax(-1)
    ps_k, pt_k = ps.gather(-1, index), pt.gather(-1, index)
    if tail:
        ps_k = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
        pt_k = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
    p, q = (Categorical(probs=pt_k), Categorical(probs=ps_k)) if divergence == "forward_kl" else (
        Categorical(probs=ps_k), Categorical(probs=pt_k))
    return kl_divergence(p, q)


@pytest.mark.parametrize("divergence,source,whose", [
    ("forward_kl", "auto", "teacher"),     # forward KL weights by the teacher: its top-k
    ("reverse_kl", "auto", "student"),
    ("forward_kl", "student", "student"),  # the old behaviour, still available
    ("reverse_kl", "teacher", "teacher"),
])
@pytest.mark.parametrize("tail", [True, False])
def test_topk_is_kl_over_the_chosen_roles_top_k(logits, divergence, source, whose, tail):
    s, t = logits
    k = 4
    got = token_divergence(s, t, DivergenceSpec(divergence, support="topk", topk=k, tail_bucket=tail, topk_from=source))
    index = (t if whose == "teacher" else s).topk(k, -1).indices
    torch.testing.assert_close(got, _reference_topk(s, t, index, divergence, tail), rtol=1e-4, atol=1e-5)


def test_topk_union_counts_each_token_once(logits):
    s, t = logits
    k = 3
    spec = DivergenceSpec("jsd", alpha=0.4, support="topk", topk=k, tail_bucket=True)
    assert spec.topk_source() == "union"
    got = token_divergence(s, t, spec)
    ps, pt = s.softmax(-1), t.softmax(-1)
    want = torch.zeros(B, T)
    for b in range(B):
        for i in range(T):
            ids = sorted(set(ps[b, i].topk(k).indices.tolist()) | set(pt[b, i].topk(k).indices.tolist()))
            p_s = torch.cat([ps[b, i, ids], 1 - ps[b, i, ids].sum(0, keepdim=True)])
            p_t = torch.cat([pt[b, i, ids], 1 - pt[b, i, ids].sum(0, keepdim=True)])
            m = 0.4 * p_t + 0.6 * p_s
            want[b, i] = 0.4 * (p_t * (p_t / m).log()).sum() + 0.6 * (p_s * (p_s / m).log()).sum()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("source", ["teacher", "student", "union"])
@pytest.mark.parametrize("tail", [True, False])
def test_topk_with_full_vocabulary_equals_full(logits, divergence, source, tail):
    s, t = logits
    s, t = s.clone().requires_grad_(), t.clone()
    full = token_divergence(s, t, DivergenceSpec(divergence))
    topk = token_divergence(s, t, DivergenceSpec(divergence, support="topk", topk=V, tail_bucket=tail, topk_from=source))
    torch.testing.assert_close(full, topk, rtol=1e-4, atol=1e-5)
    (g_full,) = torch.autograd.grad(full.sum(), s)
    (g_topk,) = torch.autograd.grad(topk.sum(), s)
    assert torch.isfinite(g_topk).all()
    torch.testing.assert_close(g_full, g_topk, rtol=1e-4, atol=1e-5)


def test_forward_kl_topk_pulls_toward_the_teachers_token_even_when_the_student_tail_underflows():
    """The student is sure of token 0 (its tail underflows float32); the teacher wants token 1.
    Forward KL over the teacher's top-k must pull token 1 up exactly as hard as the full vocabulary
    does; the student's own top-k (the old default) does not even contain token 1."""
    s = torch.full((1, 1, V), -60.0)
    s[..., 0] = 60.0
    s[..., 2] = -50.0  # the student's second choice, so its top-2 is {0, 2}
    s.requires_grad_()
    t = torch.zeros(1, 1, V)
    t[..., 1] = 8.0
    full = token_divergence(s, t, DivergenceSpec("forward_kl"))
    teacher_k = token_divergence(s, t, DivergenceSpec("forward_kl", support="topk", topk=2))
    student_k = token_divergence(s, t, DivergenceSpec("forward_kl", support="topk", topk=2, topk_from="student"))
    (g_full,) = torch.autograd.grad(full.sum(), s)
    (g_teacher,) = torch.autograd.grad(teacher_k.sum(), s)
    (g_student,) = torch.autograd.grad(student_k.sum(), s)
    assert g_full[0, 0, 1] < -0.9  # raise token 1: d/dlogit = p_s - p_t
    torch.testing.assert_close(g_teacher[0, 0, 1], g_full[0, 0, 1], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(teacher_k).all() and torch.isfinite(g_teacher).all()
    # through the exact tail bucket the student's top-k still pulls, but only by token 1's share
    # of the tail (1 of 9 tokens here): weaker, though no longer zero as with a floored tail
    assert 0 < -g_student[0, 0, 1] < 0.2 * -g_full[0, 0, 1]


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


def test_sampled_estimator_reusing_a_rollout_is_the_clipped_surrogate():
    torch.manual_seed(2)
    theta = torch.randn(1, 4, V, requires_grad=True)
    q_logits = torch.randn(1, 4, V)
    tokens = torch.tensor([[0, 3, 5, 7]])
    spec = DivergenceSpec("reverse_kl", support="sampled", clip_ratio=0.2)
    logp = theta.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logq = q_logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    # old = current: exactly the on-policy estimator, value and gradient
    fresh = token_divergence(theta, q_logits, spec, tokens)
    same = token_divergence(theta, q_logits, spec, tokens, old_logp=logp.detach())
    torch.testing.assert_close(fresh, same)
    (g_fresh,) = torch.autograd.grad(fresh.sum(), theta)
    (g_same,) = torch.autograd.grad(same.sum(), theta)
    torch.testing.assert_close(g_fresh, g_same)

    # a stale sampler: rho = p/p_old, advantage A = log q - log p_old; -min(rho A, clip(rho) A)
    old = logp.detach() + torch.tensor([[0.1, -0.1, 0.5, -0.5]])  # rho = e^-0.1, e^0.1, e^-0.5, e^0.5
    got = token_divergence(theta, q_logits, spec, tokens, old_logp=old)
    torch.testing.assert_close(got, (logp - logq).detach())  # the value stays the log-ratio estimate
    rho = torch.exp(logp - old)
    advantage = logq - old
    want = -torch.minimum(rho * advantage, rho.clamp(0.8, 1.2) * advantage)
    (g_got,) = torch.autograd.grad(got.sum(), theta, retain_graph=True)
    (g_want,) = torch.autograd.grad(want.sum(), theta)
    torch.testing.assert_close(g_got, g_want)
    # outside the clip range, in the direction the clip stops, a token gets no gradient
    for i in (2, 3):
        clipped_out = (rho[0, i] < 0.8 and advantage[0, i] < 0) or (rho[0, i] > 1.2 and advantage[0, i] > 0)
        (g_i,) = torch.autograd.grad(got[0, i], theta, retain_graph=True)
        assert (g_i.abs().max() == 0) == bool(clipped_out)


@pytest.mark.parametrize("spec", [
    DivergenceSpec("forward_kl"),
    DivergenceSpec("jsd", alpha=0.3, support="topk", topk=4),
    DivergenceSpec("reverse_kl", support="sampled"),
])
@pytest.mark.parametrize("head_trained", [False, True], ids=["frozen head: gradient in forward", "trained head: recomputed"])
def test_chunked_equals_unchunked_in_value_and_gradient(spec, head_trained):
    torch.manual_seed(2)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(head_trained)
    hs = torch.randn(B, T, H, requires_grad=True)
    ht = torch.randn(B, T, H)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3  # the upstream gradient differs by position
    inputs = (hs, head.weight) if head_trained else (hs,)

    full = token_divergence(head(hs), head(ht).detach(), spec, tokens)  # the teacher is a fixed target
    want = torch.autograd.grad(masked_sequence_mean(full, mask), inputs)
    chunked = chunked_token_divergence(hs, ht, head, spec, tokens, chunk=3)
    got = torch.autograd.grad(masked_sequence_mean(chunked, mask), inputs)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for g_chunked, g_full in zip(got, want):
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
    weights = torch.rand(B, T)
    head.requires_grad_(False)  # the gradient taken in the forward pass, scaled per position
    (g_chunked,) = torch.autograd.grad((chunked_token_nll(h, head, y, chunk=2) * weights).sum(), h)
    (g_full,) = torch.autograd.grad((sft_token_nll(head(h), y) * weights).sum(), h)
    torch.testing.assert_close(g_chunked, g_full)


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


def two_rows_at_half_and_one(seed: int):
    """An LM head, two rows of student and teacher hidden states, tokens, a full mask and the
    teacher's temperature per position: 0.5 on row 0, 1 on row 1."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    hs, ht = torch.randn(2, T, H), torch.randn(2, T, H)
    tokens = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.bool)
    return head, hs, ht, tokens, mask, torch.tensor([[0.5] * T, [1.0] * T])


def test_teacher_temperature_is_kl_to_the_tempered_teacher_per_row_and_leaves_the_stats_alone():
    """Row 0 at temperature 0.5 is KL(softmax(t / 0.5) || s) by torch.distributions; row 1 at 1 is
    the plain KL; the stats (teacher log-prob of the token) describe the untempered teacher."""
    from sdcli.training.losses import STAT_TEACHER_LOGP, packed_divergence_and_stats

    head, hs, ht, tokens, mask, temperature = two_rows_at_half_and_one(seed=5)
    per_token, stats = packed_divergence_and_stats(
        hs, ht, mask, head, DivergenceSpec("forward_kl"), tokens, 3, None, temperature
    )
    with torch.no_grad():
        s_logits, t_logits = head(hs), head(ht)
    want = torch.stack([
        kl_divergence(Categorical(logits=t_logits[0] / 0.5), Categorical(logits=s_logits[0])),
        kl_divergence(Categorical(logits=t_logits[1]), Categorical(logits=s_logits[1])),
    ])
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-6)
    untempered = torch.log_softmax(t_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stats[..., STAT_TEACHER_LOGP], untempered, rtol=1e-5, atol=1e-6)
    # sharpening moves the target: row 0 differs from the untempered KL
    plain = kl_divergence(Categorical(logits=t_logits[0]), Categorical(logits=s_logits[0]))
    assert (per_token[0] - plain).abs().max() > 1e-2


def test_lead_with_trades_the_tokens_logit_with_the_largest_only_where_asked():
    """A plain loop over positions: where asked and the token is not first, its logit and the
    largest trade places; every other logit, and every position not asked, stays."""
    from sdcli.training.losses import lead_with

    torch.manual_seed(6)
    logits = torch.randn(2, T, V)
    tokens = torch.randint(0, V, (2, T))
    tokens[0, 0] = logits[0, 0].argmax()  # already first: nothing to trade
    tokens[0, 1] = logits[0, 1].argmin()  # last: trades with the first
    where = torch.rand(2, T) < 0.7
    where[0, 0] = where[0, 1] = True
    got = lead_with(logits, tokens, where)
    want = logits.clone()
    for b in range(2):
        for t in range(T):
            if where[b, t]:
                top, y = int(logits[b, t].argmax()), int(tokens[b, t])
                want[b, t, top], want[b, t, y] = logits[b, t, y], logits[b, t, top]
    assert torch.equal(got, want)
    assert torch.equal(got[0, 0], logits[0, 0])
    assert not torch.equal(got[0, 1], logits[0, 1])
    assert (got.argmax(-1)[where] == tokens[where]).all()  # the token leads wherever asked
    # the same probabilities, held by other tokens
    torch.testing.assert_close(got.softmax(-1).sort(-1).values, logits.softmax(-1).sort(-1).values)


def test_lead_is_kl_to_the_tempered_teacher_with_the_response_token_first():
    """Row 0 leads (at temperature 0.5), row 1 does not: KL(softmax(lead_with(t / 0.5)) || s) and
    the plain KL, by torch.distributions; the stats still describe the teacher as it is (its
    log-prob of the token and its own first choice, neither tempered nor led)."""
    from sdcli.training.losses import STAT_TEACHER_LOGP, STAT_TEACHER_TOP, lead_with, packed_divergence_and_stats

    head, hs, ht, tokens, mask, temperature = two_rows_at_half_and_one(seed=7)
    lead = torch.tensor([[True] * T, [False] * T])
    per_token, stats = packed_divergence_and_stats(
        hs, ht, mask, head, DivergenceSpec("forward_kl"), tokens, 3, None, temperature, lead
    )
    with torch.no_grad():
        s_logits, t_logits = head(hs), head(ht)
    led = lead_with(t_logits[:1] / 0.5, tokens[:1], lead[:1])[0]
    want = torch.stack([
        kl_divergence(Categorical(logits=led), Categorical(logits=s_logits[0])),
        kl_divergence(Categorical(logits=t_logits[1]), Categorical(logits=s_logits[1])),
    ])
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-6)
    untempered = torch.log_softmax(t_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stats[..., STAT_TEACHER_LOGP], untempered, rtol=1e-5, atol=1e-6)
    top = stats[..., STAT_TEACHER_TOP].long()  # a largest logit's token (a near-tie may go either way on another CPU)
    torch.testing.assert_close(t_logits.gather(-1, top.unsqueeze(-1)).squeeze(-1), t_logits.amax(-1), rtol=1e-5, atol=1e-6)
    plain = kl_divergence(Categorical(logits=t_logits[0] / 0.5), Categorical(logits=s_logits[0]))
    assert (per_token[0] - plain).abs().max() > 1e-2  # leading moves the target
    with pytest.raises(ValueError, match="tokens"):
        packed_divergence_and_stats(hs, ht, mask, head, DivergenceSpec("forward_kl"), None, 3, None, None, lead)


def test_masked_sequence_mean_weights_scale_one_sequence_only():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([1.0, 3.0, 5.0])
    # sequence means 2 and 2, weighted 1 and 3, over the 2 sequences with tokens; the empty one is left out
    assert masked_sequence_mean(per_token, mask, weights).item() == pytest.approx((2.0 + 3 * 2.0) / 2)
    assert masked_sequence_mean(per_token, mask, torch.ones(3)).item() == masked_sequence_mean(per_token, mask).item()


def test_anchor_weights_only_on_anchors():
    from sdcli.training.batch import ANCHOR, KIND_INDEX, OFF_POLICY, ON_POLICY, anchor_weights

    kinds = torch.tensor([KIND_INDEX[ON_POLICY], KIND_INDEX[OFF_POLICY], KIND_INDEX[ANCHOR]])
    assert anchor_weights(kinds, 1.0) is None
    assert anchor_weights(kinds, 4.0).tolist() == [1.0, 1.0, 4.0]
