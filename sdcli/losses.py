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
    topk      the student's top-k tokens; with `tail_bucket` one more category holds the
              probability outside them, otherwise both distributions are renormalised over k.
    sampled   only the generated token y_t: the single-sample estimate of reverse KL,
              log p_s(y_t) - log p_t(y_t). Its value is that estimate; its gradient is the
              policy-gradient form (log p_s(y_t) - log p_t(y_t)) * grad log p_s(y_t).
              It credits each token with its own log-ratio only (no sum over later tokens),
              trading the exact sequence-level gradient for lower variance.

Memory: full-vocabulary logits are never held for the whole sequence. `chunked_token_divergence`
takes final hidden states and projects them through the LM head a chunk of positions at a time;
the student's chunk is recomputed in backward (activation checkpointing), so at most one chunk of
[B, chunk, V] float32 logits per role exists at any moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DivergenceSpec:
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    alpha: float = 0.5
    support: str = "full"  # full | topk | sampled
    topk: int = 20
    tail_bucket: bool = True

    @classmethod
    def from_config(cls, loss_cfg) -> "DivergenceSpec":
        return cls(
            divergence=loss_cfg.divergence.value,
            alpha=loss_cfg.alpha,
            support=loss_cfg.support.value,
            topk=loss_cfg.topk,
            tail_bucket=loss_cfg.tail_bucket,
        )


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities. [..., K] -> [...]"""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence_from_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """[..., K] log-probabilities of both roles over the same K categories -> [...] divergence."""
    if divergence == "forward_kl" or (divergence == "jsd" and alpha == 0.0):
        return _kl(teacher_logp, student_logp)
    if divergence == "reverse_kl" or (divergence == "jsd" and alpha == 1.0):
        return _kl(student_logp, teacher_logp)
    if divergence == "jsd":
        mixture = torch.logsumexp(
            torch.stack([teacher_logp + math.log(alpha), student_logp + math.log(1.0 - alpha)]), dim=0
        )
        return alpha * _kl(teacher_logp, mixture) + (1.0 - alpha) * _kl(student_logp, mixture)
    raise ValueError(f"unknown divergence {divergence!r}; expected forward_kl, reverse_kl or jsd")


def _with_tail(logp_k: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum p_k) as one more category. [..., K] -> [..., K+1]"""
    covered = torch.logsumexp(logp_k, dim=-1, keepdim=True).clamp(max=0.0)
    tail = torch.log((-torch.expm1(covered)).clamp(min=1e-30))
    return torch.cat([logp_k, tail], dim=-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence.

    student_logits, teacher_logits: [B, T, V] (any float dtype; computed in float32).
    tokens: [B, T] the generated response tokens (needed for support="sampled").
    Returns: [B, T] float32.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    if spec.support == "full":
        return divergence_from_logprobs(s, t, spec.divergence, spec.alpha)
    if spec.support == "topk":
        k = min(spec.topk, s.shape[-1])
        index = s.detach().topk(k, dim=-1).indices
        s_k, t_k = s.gather(-1, index), t.gather(-1, index)
        if spec.tail_bucket:
            s_k, t_k = _with_tail(s_k), _with_tail(t_k)
        else:
            s_k, t_k = F.log_softmax(s_k, dim=-1), F.log_softmax(t_k, dim=-1)
        return divergence_from_logprobs(s_k, t_k, spec.divergence, spec.alpha)
    if spec.support == "sampled":
        if tokens is None:
            raise ValueError("support='sampled' needs the generated tokens")
        if spec.divergence != "reverse_kl":
            raise ValueError("support='sampled' estimates reverse KL only")
        s_y = s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        t_y = t.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        ratio = (s_y - t_y).detach()
        # value: the log-ratio estimate; gradient: ratio * grad log p_s(y)
        return ratio * s_y + (ratio - ratio * s_y).detach()
    raise ValueError(f"unknown support {spec.support!r}; expected full, topk or sampled")


def chunked_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """The same as `token_divergence(lm_head(student_hidden), lm_head(teacher_hidden))`, in chunks.

    student_hidden: [B, T, H] (requires grad), teacher_hidden: [B, T, H] (no grad).
    Returns [B, T] float32, differentiable with respect to student_hidden.
    """

    def piece(s_h: torch.Tensor, t_h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            t_logits = lm_head(t_h)
        return token_divergence(lm_head(s_h), t_logits, spec, y)

    return _over_chunks(piece, student_hidden, teacher_hidden, tokens, chunk=chunk)


def _over_chunks(fn, grad_input: torch.Tensor, *others: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """fn(grad_input[:, c], *others[:, c]) -> [B, c] for each chunk c of positions, concatenated.

    While gradients are on, each chunk is checkpointed: its logits are recomputed in backward
    instead of being kept, so at most one chunk of [B, chunk, V] logits is alive at a time.
    """
    pieces = []
    for start in range(0, grad_input.shape[1], chunk):
        args = [t[:, start : start + chunk] if t is not None else None for t in (grad_input, *others)]
        if torch.is_grad_enabled() and grad_input.requires_grad:
            pieces.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            pieces.append(fn(*args))
    return torch.cat(pieces, dim=1)


def masked_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's unmasked tokens, then over sequences that have any.

    per_token: [B, T]; mask: [B, T] bool or {0,1}. Returns a scalar. With an empty mask the
    result is a zero still attached to the graph (so backward() is a no-op, never NaN).
    """
    mask = mask.to(per_token.dtype)
    counts = mask.sum(-1)
    has_tokens = counts > 0
    if not bool(has_tokens.any()):
        return (per_token * 0.0).sum()
    per_sequence = (per_token * mask).sum(-1) / counts.clamp(min=1.0)
    return per_sequence[has_tokens].mean()


def sft_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token. logits [B, T, V], targets [B, T] -> [B, T]."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """`sft_token_nll(lm_head(hidden), targets)` computed a chunk of positions at a time. [B,T,H] -> [B,T]"""
    return _over_chunks(lambda h, y: sft_token_nll(lm_head(h), y), hidden, targets, chunk=chunk)


def packed_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head: torch.nn.Module,
    spec: DivergenceSpec,
    tokens: torch.Tensor | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """`chunked_token_divergence` over the unmasked positions only (padding costs no LM-head work).

    student_hidden, teacher_hidden: [B, T, H]; mask: [B, T] bool. Returns [B, T], zero where masked.
    """
    packed = chunked_token_divergence(
        student_hidden[mask].unsqueeze(0), teacher_hidden[mask].unsqueeze(0), lm_head, spec,
        tokens[mask].unsqueeze(0) if tokens is not None else None, chunk,
    )[0]
    per_token = student_hidden.new_zeros(mask.shape, dtype=packed.dtype)
    return per_token.index_put((mask,), packed)
