"""Per-token divergences between the student and the teacher, as pure functions.

Notation: B = sequences, T = response positions, V = vocabulary, H = hidden size.
`p_s` is the student's next-token distribution (sees only the prompt), `p_t` the teacher's (sees
prompt + context). For every response position t:

    forward_kl   KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))     (what SDFT used)
    reverse_kl   KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))     (the seed formula)
    jsd(alpha)   alpha KL(p_t || m) + (1 - alpha) KL(p_s || m),  m = alpha p_t + (1 - alpha) p_s
                 alpha = 0 is forward KL and alpha = 1 reverse KL exactly (the mixture form
                 vanishes at the ends, so the ends are special-cased as in GKD).

Supports:
    full      the whole vocabulary.
    topk      k tokens per position, taken from the top-k of the role whose distribution the
              divergence weights: the teacher's for forward KL (the student's own top-k could
              never raise a token the student does not already rank), the student's for reverse
              KL, the union of both for JSD (`topk_from` overrides). With `tail_bucket` one more
              category holds the probability outside them, computed exactly as the log-sum-exp
              of the logits outside the set (no floor); otherwise both distributions are
              renormalised over the set. With k = V it equals `full`.
    sampled   only the generated token y_t: the single-sample estimate of reverse KL,
              log p_s(y_t) - log p_t(y_t). Its value is that estimate; its gradient is the
              policy-gradient form (log p_s(y_t) - log p_t(y_t)) * grad log p_s(y_t).
              It credits each token with its own log-ratio only (no sum over later tokens),
              trading the exact sequence-level gradient for lower variance.
              Reusing a rollout for several updates (`old_logp` given), the gradient becomes
              PPO's clipped surrogate: advantage A = log p_t(y) - log p_old(y), ratio
              rho = p_s(y) / p_old(y), loss -min(rho A, clip(rho, 1-eps, 1+eps) A). At the
              first update rho = 1 and it is exactly the gradient above.

Memory: full-vocabulary logits are never held for the whole sequence. `chunked_token_divergence`
takes final hidden states and projects them through the LM head a chunk of positions at a time,
so at most one chunk of [B, chunk, V] float32 logits per role exists at any moment. Each
position's value depends on that position's hidden state alone, so the forward pass also takes
its gradient with respect to it ([B, chunk, H], small) and backward only scales it by the
upstream gradient: the logits are computed once, not again in backward. (Where the LM head itself
is trained, the chunk is recomputed in backward instead: activation checkpointing.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sdcli.core.divergence import kl as _kl


@dataclass(frozen=True)
class DivergenceSpec:
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    alpha: float = 0.5
    support: str = "full"  # full | topk | sampled
    topk: int = 20
    tail_bucket: bool = True
    topk_from: str = "auto"  # auto | teacher | student | union
    clip_ratio: float = 0.2  # sampled support with a reused rollout: PPO clip epsilon

    @classmethod
    def from_config(cls, loss_cfg) -> "DivergenceSpec":
        return cls(
            divergence=loss_cfg.divergence.value,
            alpha=loss_cfg.alpha,
            support=loss_cfg.support.value,
            topk=loss_cfg.topk,
            tail_bucket=loss_cfg.tail_bucket,
            topk_from=loss_cfg.topk_from,
            clip_ratio=loss_cfg.clip_ratio,
        )

    def topk_source(self) -> str:
        """Whose top-k picks the support: the distribution the divergence is an expectation under."""
        if self.topk_from != "auto":
            return self.topk_from
        return {"forward_kl": "teacher", "reverse_kl": "student"}.get(self.divergence, "union")


def divergence_from_logprobs(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, divergence: str, alpha: float, alive: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., K] log-probabilities of both roles over the same K categories -> [...] divergence."""
    if divergence == "forward_kl" or (divergence == "jsd" and alpha == 0.0):
        return _kl(teacher_logp, student_logp, alive)
    if divergence == "reverse_kl" or (divergence == "jsd" and alpha == 1.0):
        return _kl(student_logp, teacher_logp, alive)
    if divergence == "jsd":
        mixture = torch.logsumexp(
            torch.stack([teacher_logp + math.log(alpha), student_logp + math.log(1.0 - alpha)]), dim=0
        )
        return alpha * _kl(teacher_logp, mixture, alive) + (1.0 - alpha) * _kl(student_logp, mixture, alive)
    raise ValueError(f"unknown divergence {divergence!r}; expected forward_kl, reverse_kl or jsd")


def _support_index(s: torch.Tensor, t: torch.Tensor, k: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the top-k support and which of them count. [..., V] x2 -> [..., K'] long, [..., K'] bool.

    A union lists the teacher's k then the student's k; a student token already among the
    teacher's is marked dead, so every token is counted once.
    """
    if source == "teacher":
        index = t.detach().topk(k, dim=-1).indices
        return index, torch.ones_like(index, dtype=torch.bool)
    if source == "student":
        index = s.detach().topk(k, dim=-1).indices
        return index, torch.ones_like(index, dtype=torch.bool)
    if source == "union":
        t_idx, s_idx = t.detach().topk(k, dim=-1).indices, s.detach().topk(k, dim=-1).indices
        repeated = (s_idx.unsqueeze(-1) == t_idx.unsqueeze(-2)).any(-1)
        alive = torch.cat([torch.ones_like(t_idx, dtype=torch.bool), ~repeated], dim=-1)
        return torch.cat([t_idx, s_idx], dim=-1), alive
    raise ValueError(f"unknown topk_from {source!r}; expected auto, teacher, student or union")


def _tail_logprob(logp: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the probability outside `index`, exactly: log-sum-exp of the log-probs outside it.

    logp [..., V], index [..., K'] -> ([..., 1] log-prob, [..., 1] bool: the tail is not empty).
    Computed from the logits, not as log(1 - covered), so a tail of 1e-40 is still 1e-40 and its
    gradient is exact; an empty tail (k = V) is marked dead instead of being -inf.
    """
    inside = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, index, True)
    exists = (~inside).any(-1, keepdim=True)
    outside = logp.masked_fill(inside, float("-inf")).masked_fill(~exists, 0.0)
    return torch.logsumexp(outside, dim=-1, keepdim=True).masked_fill(~exists, 0.0), exists


def _topk_divergence(s: torch.Tensor, t: torch.Tensor, spec: "DivergenceSpec") -> torch.Tensor:
    """The divergence over the top-k support (+ the exact tail). [..., V] log-probs -> [...]"""
    index, alive = _support_index(s, t, min(spec.topk, s.shape[-1]), spec.topk_source())
    # dead entries are set to 0 before anything is computed from them, so no -inf ever reaches
    # an exp or a gradient
    s_k = s.gather(-1, index).masked_fill(~alive, 0.0)
    t_k = t.gather(-1, index).masked_fill(~alive, 0.0)
    if spec.tail_bucket:
        s_tail, exists = _tail_logprob(s, index)
        t_tail, _ = _tail_logprob(t, index)
        s_k, t_k = torch.cat([s_k, s_tail], -1), torch.cat([t_k, t_tail], -1)
        alive = torch.cat([alive, exists], -1)
    else:
        s_k = _renormalise(s_k, alive)
        t_k = _renormalise(t_k, alive)
    return divergence_from_logprobs(s_k, t_k, spec.divergence, spec.alpha, alive)


def _renormalise(logp_k: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """log-softmax over the alive categories only; dead ones are left at 0 (masked later)."""
    total = torch.logsumexp(logp_k.masked_fill(~alive, float("-inf")), dim=-1, keepdim=True)
    return (logp_k - total).masked_fill(~alive, 0.0)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence.

    student_logits, teacher_logits: [B, T, V] (any float dtype; computed in float32).
    tokens: [B, T] the generated response tokens (needed for support="sampled").
    old_logp: [B, T] log p of `tokens` under the student that sampled them, for a rollout reused
        over several updates (support="sampled" only; None = the current student, rho = 1).
    Returns: [B, T] float32.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    if spec.support == "full":
        return divergence_from_logprobs(s, t, spec.divergence, spec.alpha)
    if spec.support == "topk":
        return _topk_divergence(s, t, spec)
    if spec.support == "sampled":
        if tokens is None:
            raise ValueError("support='sampled' needs the generated tokens")
        if spec.divergence != "reverse_kl":
            raise ValueError("support='sampled' estimates reverse KL only")
        s_y = s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        t_y = t.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        old = s_y.detach() if old_logp is None else old_logp.to(s_y.dtype)
        advantage = t_y - old  # > 0 where the teacher wants more of y than the sampler gave it
        rho = torch.exp(s_y - old)
        clipped = rho.clamp(1.0 - spec.clip_ratio, 1.0 + spec.clip_ratio)
        surrogate = -torch.minimum(rho * advantage, clipped * advantage)
        # value: the log-ratio estimate log p_s(y) - log p_t(y); gradient: the surrogate's
        return surrogate + ((s_y - t_y).detach() - surrogate).detach()
    raise ValueError(f"unknown support {spec.support!r}; expected full, topk or sampled")


def chunked_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same as `token_divergence(lm_head(student_hidden), lm_head(teacher_hidden))`, in chunks.

    student_hidden: [B, T, H] (requires grad), teacher_hidden: [B, T, H] (no grad).
    Returns [B, T] float32, differentiable with respect to student_hidden.
    """
    return chunked_divergence_and_stats(student_hidden, teacher_hidden, lm_head, spec, tokens, chunk, old_logp)[0]


def chunked_divergence_and_stats(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
    old_logp: torch.Tensor | None = None,
    teacher_temperature: torch.Tensor | None = None,
    lead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunked_token_divergence`, plus `token_stats` of the same logits when `tokens` is given
    (computed in the same pass over the LM head, so watching the learning costs nothing).

    teacher_temperature: [B, T] or None. The target is softmax(teacher_logits / temperature) at
        each position: below 1 it sharpens the teacher toward its own first choice. The stats
        always describe the teacher as it is (temperature 1).
    lead: [B, T] bool or None. Where True, the target leads with `tokens` (`lead_with`).
    Returns ([B, T] divergence, [B, T, 4] stats or None).
    """
    if lead is not None and tokens is None:
        raise ValueError("lead needs the response tokens")

    def piece(s_h: torch.Tensor, t_h: torch.Tensor, y: torch.Tensor | None, old: torch.Tensor | None,
              temp: torch.Tensor | None, led: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            t_logits = lm_head(t_h)
            target = t_logits if temp is None else t_logits.float() / temp.unsqueeze(-1)
            if led is not None:
                target = lead_with(target, y, led)
        s_logits = lm_head(s_h)
        divergence = token_divergence(s_logits, target, spec, y, old)
        return divergence, (token_stats(s_logits, t_logits, y) if y is not None else None)

    return _over_chunks(piece, student_hidden, teacher_hidden, tokens, old_logp, teacher_temperature, lead,
                        chunk=chunk, positionwise=not _trained(lm_head))


def lead_with(logits: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits in which, at the positions `where` ([B, T] bool), the logit of `tokens`
    ([B, T]) and the largest logit trade places: the token comes first, and every probability of
    the distribution is still one the teacher gave (only which token holds it changes). Elsewhere,
    and where the token already leads, the logits are unchanged."""
    if not bool(where.any()):  # a chunk of anchors or samples only: no [B, T, V] copy
        return logits
    y = tokens.unsqueeze(-1)
    top = torch.where(where, logits.argmax(-1), tokens).unsqueeze(-1)  # not asked: the token trades with itself
    top_logit, y_logit = logits.gather(-1, top), logits.gather(-1, y)
    return logits.clone().scatter_(-1, top, y_logit).scatter_(-1, y, top_logit)  # one [B, T, V] copy, not three


STAT_STUDENT_LOGP, STAT_TEACHER_LOGP, STAT_DISAGREE, STAT_TEACHER_TOP = 0, 1, 2, 3


@torch.no_grad()
def token_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """What the learning looks like per position, without gradients.

    [B, T, V] x2, [B, T] -> [B, T, 4]: log p_s(y_t), log p_t(y_t), 1.0 where the two roles' most
    likely next tokens differ, and the teacher's most likely token (its id, exact in float32 for
    any vocabulary under 2^24). log p_t(y_t) - log p_s(y_t) is the per-token advantage (the
    teacher wants more of y_t where it is positive).
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    index = tokens.unsqueeze(-1)
    teacher_top = t.argmax(-1)
    disagree = (s.argmax(-1) != teacher_top).float()
    return torch.stack(
        [s.gather(-1, index).squeeze(-1), t.gather(-1, index).squeeze(-1), disagree, teacher_top.float()], dim=-1
    )


def _trained(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _over_chunks(fn, grad_input: torch.Tensor, *others: torch.Tensor | None, chunk: int,
                 positionwise: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fn(grad_input[:, c], *others[:, c]) -> ([B, c] values, [B, c, k] extras without gradient, or
    None) for each chunk c of positions, concatenated.

    While gradients are on, at most one chunk of [B, chunk, V] logits is alive at a time: with
    `positionwise` (each value depends only on its own position of grad_input, and fn has no
    trained parameters of its own) each value's gradient is taken in the forward pass
    (`_PositionwiseGradient`); otherwise each chunk is checkpointed and recomputed in backward.
    """
    values, extras = [], []
    for start in range(0, grad_input.shape[1], chunk):
        args = [t[:, start : start + chunk] if t is not None else None for t in (grad_input, *others)]
        if not (torch.is_grad_enabled() and grad_input.requires_grad):
            value, extra = fn(*args)
        elif positionwise:
            found: list = []
            value = _PositionwiseGradient.apply(args[0], fn, args[1:], found)
            extra = found[0]
        else:
            value, extra = checkpoint(fn, *args, use_reentrant=False)
        values.append(value)
        extras.append(extra)
    return torch.cat(values, dim=1), (torch.cat(extras, dim=1) if extras[0] is not None else None)


class _PositionwiseGradient(torch.autograd.Function):
    """values = fn(h, *others)[0], [B, c], where values[:, t] depends on h[:, t] alone. The forward
    pass also computes d values[:, t] / d h[:, t] for every t (one backward through the chunk, as
    the sum's gradient: no position contributes to another's), and backward returns it times the
    upstream gradient. Exact, and the chunk's logits are never recomputed."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, fn, others: list, found: list) -> torch.Tensor:
        with torch.enable_grad():
            leaf = h.detach().requires_grad_()
            values, extras = fn(leaf, *others)
            gradient = torch.autograd.grad(values.sum(), leaf)[0] if values.requires_grad else torch.zeros_like(leaf)
        ctx.save_for_backward(gradient)
        found.append(extras)
        return values.detach()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return (upstream.unsqueeze(-1) * gradient).to(gradient.dtype), None, None, None


def masked_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each sequence's unmasked tokens, then over sequences that have any.

    per_token: [B, T]; mask: [B, T] bool or {0,1}; weights: [B] or None (all 1). Returns a scalar:
    sum_b w_b * mean_t(per_token[b]) / (number of sequences with tokens), so a weight scales one
    sequence's pull without changing the others'. With an empty mask the result is a zero still
    attached to the graph (so backward() is a no-op, never NaN).
    """
    mask = mask.to(per_token.dtype)
    counts = mask.sum(-1)
    has_tokens = counts > 0
    if not bool(has_tokens.any()):
        return (per_token * 0.0).sum()
    per_sequence = (per_token * mask).sum(-1) / counts.clamp(min=1.0)
    if weights is not None:
        per_sequence = per_sequence * weights.to(per_sequence.dtype)
    return per_sequence[has_tokens].mean()


def sft_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token. logits [B, T, V], targets [B, T] -> [B, T]."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """`sft_token_nll(lm_head(hidden), targets)` computed a chunk of positions at a time. [B,T,H] -> [B,T]"""
    return _over_chunks(lambda h, y: (sft_token_nll(lm_head(h), y), None), hidden, targets, chunk=chunk,
                        positionwise=not _trained(lm_head))[0]


def packed_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """`chunked_token_divergence` over the unmasked positions only (padding costs no LM-head work).

    student_hidden, teacher_hidden: [B, T, H]; mask: [B, T] bool. Returns [B, T], zero where masked.
    """
    return packed_divergence_and_stats(student_hidden, teacher_hidden, mask, lm_head, spec, tokens, chunk, old_logp)[0]


def packed_divergence_and_stats(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
    old_logp: torch.Tensor | None = None,
    teacher_temperature: torch.Tensor | None = None,
    lead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`packed_token_divergence` and, with `tokens`, its [B, T, 4] `token_stats` (zero where masked).
    teacher_temperature: [B, T] or None, lead: [B, T] bool or None, as in `chunked_divergence_and_stats`."""

    def packed(x: torch.Tensor | None) -> torch.Tensor | None:
        return x[mask].unsqueeze(0) if x is not None else None

    divergence, stats = chunked_divergence_and_stats(
        packed(student_hidden), packed(teacher_hidden), lm_head, spec, packed(tokens), chunk, packed(old_logp),
        packed(teacher_temperature), packed(lead),
    )
    per_token = student_hidden.new_zeros(mask.shape, dtype=divergence.dtype).index_put((mask,), divergence[0])
    if stats is None:
        return per_token, None
    return per_token, stats.new_zeros((*mask.shape, stats.shape[-1])).index_put((mask,), stats[0])
