"""KL divergence from log-probabilities: the one formula that training's losses
(sdcli.training.losses) and evaluation's drift (sdcli.evaluation.drift) both use.

    KL(p || q) = sum_v p(v) (log p(v) - log q(v))

It needs no import of torch: it uses only tensor methods, so it sits in core, beneath both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def kl(logp: "torch.Tensor", logq: "torch.Tensor", alive: "torch.Tensor | None" = None) -> "torch.Tensor":
    """KL(p || q) over the last dim, from log-probabilities. [..., K] -> [...]

    `alive` [..., K] bool marks the categories that exist; the others (an empty tail, a token
    counted twice in a union) contribute nothing and their entries may hold any finite value.
    """
    terms = logp.exp() * (logp - logq)
    return (terms if alive is None else terms * alive).sum(-1)
