"""The names of the per-step metrics that carry no namespace of their own, and the names older runs
used for them.

The training loop writes these keys to metrics.jsonl (and TensorBoard, and an episode.json's
`final`); `sd report` and `sd list` read them. Every key is namespaced: `loss/*`, `optim/*`,
`speed/*`, `time/*`, `memory/*`, `rollout/*`, `learn/*`, `advantage/*`, `signal/*`, `response/*`;
`step` and `steps_total` count steps. Run folders written before the names were namespaced hold
the keys of RENAMED; `current_names` reads them under today's names.
"""

from __future__ import annotations

LOSS = "loss/total"  # the loss the step minimised (per-sequence mean of the per-token loss)
DIVERGENCE = "loss/divergence"  # token mean of the per-token divergence; NaN for method: sft
LR = "optim/lr"
GRAD_NORM = "optim/grad_norm"  # before clipping
TOKENS_PER_S = "speed/tokens_per_s"  # sampled tokens per second of the whole step
# the demonstrations' NLL per token under the student and the teacher, on steps that learn one off-policy
DEMO_NLL_STUDENT = "learn/demo_nll_student"
DEMO_NLL_TEACHER = "learn/demo_nll_teacher"

# old name -> today's. `kl` was the divergence whichever it was (forward KL, reverse KL or JSD).
RENAMED = {"loss": LOSS, "kl": DIVERGENCE, "lr": LR, "grad_norm": GRAD_NORM, "tokens_per_s": TOKENS_PER_S}


def divergence_name(divergence: str) -> str:
    """The key that names the divergence itself: loss/forward_kl, loss/reverse_kl or loss/jsd."""
    return f"loss/{divergence}"


def current_names(row: dict) -> dict:
    """A metrics row (or an episode's `final`) with old names read as today's; a key present under
    both names keeps today's value."""
    return {RENAMED.get(key, key): value for key, value in row.items() if RENAMED.get(key) not in row}
