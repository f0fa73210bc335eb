"""The per-step log line: what metrics.jsonl, TensorBoard and the progress display get after every step.

Names are namespaced (sdcli.core.metric_names holds the ones without a prefix of their own):
    loss/total, loss/divergence and loss/<divergence>   the step's loss and its divergence
    loss/on_policy, loss/off_policy, loss/anchor        each part's loss
    optim/lr, optim/grad_norm                           the optimizer
    speed/tokens_per_s, rollout/tokens_per_s            sampled tokens per second of the step, of the rollout
    time/<phase>_s, memory/<phase>_peak_mb              per phase (rollout, context, teacher, student, sync, optimizer)
    learn/*, advantage/*                                is the student approaching the teacher (learning_metrics)
    signal/*, response/*                                what the signal built, how long the responses were
Under several ranks every figure but time/* and memory/* is over the global batch (global_step_metrics).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sdcli.core.metric_names import (
    DEMO_NLL_STUDENT, DEMO_NLL_TEACHER, DIVERGENCE, GRAD_NORM, LOSS, LR, TOKENS_PER_S, divergence_name,
)
from sdcli.signals.base import TeacherView
from sdcli.training.distributed import stack_padded
from sdcli.training.batch import anchor_weights
from sdcli.training.losses import STAT_DISAGREE, STAT_STUDENT_LOGP, STAT_TEACHER_LOGP, masked_sequence_mean
from sdcli.training.memory import PeakMemory


@dataclass
class PhaseTimer:
    """Seconds and peak memory per phase. On CUDA it waits for the GPU at both ends of a phase:
    otherwise kernels still queued when a phase's Python returns are billed to whichever later
    phase waits for them first (or to none, for the step's last one)."""

    memory: PeakMemory
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        on_gpu = self.memory.device.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize(self.memory.device)
        start = time.perf_counter()
        self.memory.start()
        try:
            yield
            if on_gpu:  # inside the phase's time: the kernels it waits for are this phase's work
                torch.cuda.synchronize(self.memory.device)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.memory.stop(name)


def masked_mean(values: torch.Tensor | None, mask: torch.Tensor | None) -> float:
    if values is None or mask is None or not bool(mask.any()):
        return float("nan")
    return float((values.detach() * mask).sum() / mask.sum())


def divergence_metrics(per_token, mask, divergence: str | None) -> dict[str, float]:
    """loss/divergence, the token mean of the per-token divergence, and the same figure under the
    divergence's own name (loss/forward_kl, loss/reverse_kl or loss/jsd). `divergence` is None for
    method: sft, which has no teacher: its loss is an NLL, not a divergence, so it is NaN there."""
    if divergence is None:
        return {DIVERGENCE: float("nan")}
    value = masked_mean(per_token, mask)
    return {DIVERGENCE: value, divergence_name(divergence): value}


def signal_metrics(views: list[TeacherView]) -> dict[str, float]:
    n = max(1, len(views))
    metrics = {
        "signal/context_fraction": sum(v.messages is not None for v in views) / n,
        "signal/masked_fraction": sum(v.messages is None for v in views) / n,
    }
    rewards = [v.reward for v in views if v.reward is not None]
    if rewards:
        metrics["signal/reward_mean"] = sum(rewards) / len(rewards)
    successes = [v.success for v in views if v.success is not None]
    if successes:
        metrics["signal/success_rate"] = sum(successes) / len(successes)
    simulated = [v.simulated_followup for v in views if v.simulated_followup is not None]
    if simulated:  # interactions, online: the user simulator's follow-ups
        metrics["signal/simulated_followups"] = len(simulated)
        metrics["signal/simulated_followup_chars"] = sum(map(len, simulated)) / len(simulated)
    return metrics


def learning_metrics(per_token, stats, mask, kinds) -> dict[str, float]:
    """Is the student approaching the teacher where it matters? Per step, from the loss's own pass.

    loss/on_policy, loss/off_policy, loss/anchor: each part's loss (per-sequence mean, as the loss).
    learn/demo_nll_student, learn/demo_nll_teacher: per-token NLL of the demonstrations under the
        student (no context) and the teacher (context); the first falling toward the second is
        the knowledge moving in.
    learn/disagreement: share of positions where the two roles' most likely tokens differ.
    advantage/*: log p_t(y) - log p_s(y) on sampled tokens: its mean, the share of tokens where
        |advantage| > 1 (how sparse the signal is) and the share where it is positive.
    """
    if per_token is None or stats is None:
        return {}
    on_mask, off_mask, anchor_mask = (mask & (kinds == k)[:, None] for k in (0, 1, 2))
    out = {"learn/disagreement": masked_mean(stats[..., STAT_DISAGREE], mask)}
    if bool(on_mask.any()):
        advantage = stats[..., STAT_TEACHER_LOGP] - stats[..., STAT_STUDENT_LOGP]
        out.update({
            "loss/on_policy": float(masked_sequence_mean(per_token.detach(), on_mask)),
            "advantage/mean": masked_mean(advantage, on_mask),
            "advantage/large_fraction": masked_mean((advantage.abs() > 1).float(), on_mask),
            "advantage/positive_fraction": masked_mean((advantage > 0).float(), on_mask),
        })
    if bool(off_mask.any()):
        out.update({
            "loss/off_policy": float(masked_sequence_mean(per_token.detach(), off_mask)),
            DEMO_NLL_STUDENT: -masked_mean(stats[..., STAT_STUDENT_LOGP], off_mask),
            DEMO_NLL_TEACHER: -masked_mean(stats[..., STAT_TEACHER_LOGP], off_mask),
        })
    if bool(anchor_mask.any()):
        out["loss/anchor"] = float(masked_sequence_mean(per_token.detach(), anchor_mask))
    return out


def step_metrics(*, step: int, total_steps: int, out, rollout, divergence: str | None, lr: float, grad_norm: float,
                 update: int, timer: PhaseTimer, step_seconds: float) -> dict:
    """The log line of one step: `out` is the step's loss (sdcli.training.step.StepLoss), `rollout`
    the sequences it learned on (sdcli.training.step.Rollout)."""
    seconds, memory = timer.seconds, timer.memory
    return {
        "step": step,
        "steps_total": total_steps,
        LOSS: float(out.loss.detach()),
        **divergence_metrics(out.per_token, out.mask, divergence),
        LR: lr,
        GRAD_NORM: grad_norm,
        "response/mean_tokens": sum(len(q.response) for q in rollout.seqs) / max(1, len(rollout.seqs)),
        TOKENS_PER_S: rollout.generated / step_seconds,
        "rollout/tokens_per_s": rollout.generated / max(1e-9, seconds.get("rollout", 0.0)),
        "rollout/update": update,
        **learning_metrics(out.per_token, out.stats, out.mask, rollout.kinds),
        **{f"time/{k}_s": round(v, 4) for k, v in seconds.items()},
        "time/step_s": round(step_seconds, 4),
        **{f"memory/{k}_peak_mb": round(v, 1) for k, v in memory.peaks_mb.items()},
        **(signal_metrics(rollout.views) if rollout.views else {}),
        **rollout.teacher_cut,
    }


def step_figures(out, rollout) -> dict:
    """What a rank sends the others after its backward pass: the number of sequences its loss
    averaged over (the weight of its gradient), and the inputs of the step's log line."""
    def cpu(t):
        return None if t is None else t.detach().cpu()

    return {
        "sequences": 0 if out.mask is None else int((out.mask.sum(-1) > 0).sum()),
        "per_token": cpu(out.per_token), "stats": cpu(out.stats), "mask": cpu(out.mask), "kinds": cpu(rollout.kinds),
        "views": [TeacherView(messages=[] if v.messages is not None else None, reward=v.reward, success=v.success)
                  for v in rollout.views],
        "lengths": [len(q.response) for q in rollout.seqs],
        "generated": rollout.generated,
        "teacher_cut": rollout.teacher_cut.get("signal/teacher_prompts_cut", 0),
    }


def global_step_metrics(shares: list[dict], divergence: str | None, step_seconds: float, rollout_seconds: float,
                        anchor_weight: float = 1.0) -> dict:
    """The figures of the step's log line over the whole global batch (every rank's share), computed
    as one process computes them on its batch; times and memory stay rank 0's own."""
    per_token = stack_padded([s["per_token"] for s in shares])
    mask = stack_padded([s["mask"] for s in shares], False)
    stats = stack_padded([s["stats"] for s in shares])
    kinds = torch.cat([s["kinds"] for s in shares if s["per_token"] is not None] or [torch.zeros(0, dtype=torch.long)])
    views = [v for s in shares for v in s["views"]]
    lengths = [n for s in shares for n in s["lengths"]]
    generated = sum(s["generated"] for s in shares)
    return {
        LOSS: float(masked_sequence_mean(per_token, mask, anchor_weights(kinds, anchor_weight))) if per_token is not None else 0.0,
        **divergence_metrics(per_token, mask, divergence),
        "response/mean_tokens": sum(lengths) / max(1, len(lengths)),
        TOKENS_PER_S: generated / step_seconds,
        "rollout/tokens_per_s": generated / max(1e-9, rollout_seconds),
        **learning_metrics(per_token, stats, mask, kinds),
        **(signal_metrics(views) if views else {}),
        **({"signal/teacher_prompts_cut": sum(s["teacher_cut"] for s in shares)} if views else {}),
    }


def grad_norm(params) -> torch.Tensor:
    """The gradients' global L2 norm, as clip_grad_norm_ reports it (for grad_clip: 0, no clipping)."""
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())
