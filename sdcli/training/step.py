"""A rollout and the loss of one update on it, one small function each per method.

    self_distillation  rollout: demonstrations off-policy, samples from the student on-policy, and
                       anchors; the signal's context for every sample; the teacher's hidden states,
                       once per rollout (no grad, episode adapter off, context on).
                       loss: per-token D(student || teacher) over the response tokens.
    sft                rollout: every example's demonstration (no sampling, no teacher).
                       loss: the demonstration's negative log-likelihood under the student.

METHODS pairs them; the loop (sdcli.training.train) picks its pair once per episode, so it has no
branch on the method. `run` is the episode's state (sdcli.training.setup.EpisodeState).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcli.models.sequences import ScoreBatch, response_hidden, score_batch
from sdcli.recipe.sections import Method
from sdcli.signals.base import Example, TeacherView, step_teacher_views
from sdcli.training.batch import (
    KIND_INDEX,
    anchor_weights,
    Sequence,
    demonstration_sequences,
    off_policy_sequences,
    rollout_sequences,
    take_anchors,
)
from sdcli.training.losses import STAT_STUDENT_LOGP, chunked_token_nll, masked_sequence_mean, packed_divergence_and_stats
from sdcli.training.teacher import target_settings, teacher_pass


@dataclass
class Rollout:
    """The sequences of one rollout, and what every update on it reuses."""

    seqs: list[Sequence]  # every sequence drawn this step (the logged lengths)
    kept: list[Sequence]  # those the loss learns on: a sample the signal masked has no teacher
    views: list[TeacherView]  # what the signal built for each sequence that has a view
    generated: int  # tokens sampled from the student
    teacher_cut: dict  # {"signal/teacher_prompts_cut": n} where there are views
    batch: ScoreBatch | None  # the student's input; None when nothing is kept
    kinds: torch.Tensor  # [N] KIND_INDEX of each kept sequence
    teacher_hidden: torch.Tensor | None = None  # [N, T, H] self-distillation: the teacher, once per rollout
    old_logp: torch.Tensor | None = None  # loss.support: sampled: the sampler's log-probs, for later updates


@dataclass
class StepLoss:
    """The loss of one update; per_token, stats and mask [N, T] feed the log line (None: nothing kept)."""

    loss: torch.Tensor
    per_token: torch.Tensor | None = None
    stats: torch.Tensor | None = None  # self-distillation only: losses.STAT_* per position
    mask: torch.Tensor | None = None


def _rollout(run, seqs, kept, views, generated, teacher_cut, hidden=None) -> Rollout:
    pad = run.tokenizer.pad_token_id
    batch = score_batch([q.prompt for q in kept], [q.response for q in kept], pad, run.device) if kept else None
    kinds = torch.tensor([KIND_INDEX[q.kind] for q in kept], dtype=torch.long, device=run.device)
    return Rollout(seqs, kept, views, generated, teacher_cut, batch, kinds, hidden)


def distillation_rollout(run, batch: list[Example], n_off: int, rollout_index: int, timer) -> Rollout:
    """1-4: `n_off` demonstrations off-policy, `rollout.num_samples` samples for the other prompts,
    the signal's context for each sample, this rank's anchors, and the teacher's hidden states."""
    recipe, tokenizer = run.recipe, run.tokenizer
    with timer("rollout"):
        off, on_policy = off_policy_sequences(batch, n_off, run.signal, run.encoder, tokenizer, run.stop,
                                              run.teacher_answers, recipe.word_dropout, recipe.train.seed,
                                              recipe.word_shuffle)
        seqs_on, generated = rollout_sequences(on_policy, recipe.rollout.num_samples, run.encoder, tokenizer, run.stop,
                                               run.sample)
    with timer("context"):
        texts = tokenizer.batch_decode([q.response for q in seqs_on], skip_special_tokens=True)
        for q, view in zip(seqs_on, step_teacher_views(run.signal, on_policy, texts, recipe.rollout.num_samples)):
            q.view = view
        anchors = run.dist.split(take_anchors(run.anchors, recipe.anchor.prompts_per_step, rollout_index))
        seqs = seqs_on + off + anchors
    views = [q.view for q in seqs if q.view is not None]
    kept = [q for q in seqs if q.view.messages is not None]  # no context: the signal masked the sample
    hidden, cut_before = None, run.teacher_encoder.cut
    if kept:
        with timer("teacher"):
            hidden = teacher_pass(run.model, run.decoder, run.teacher_encoder, kept, tokenizer.pad_token_id, run.device,
                                  run.teacher_set, run.anchor_set, run.teacher_memo)
    teacher_cut = {"signal/teacher_prompts_cut": run.teacher_encoder.cut - cut_before} if views else {}
    return _rollout(run, seqs, kept, views, generated, teacher_cut, hidden)


def distillation_loss(run, rollout: Rollout) -> StepLoss:
    """5-6: the student's hidden states and the per-token divergence from the teacher's."""
    cfg, batch = run.recipe.loss, rollout.batch
    mask = batch.response_mask.clone()
    mask[:, : cfg.skip_first_tokens] = False
    s_hidden = response_hidden(run.decoder, batch)
    per_token, stats = packed_divergence_and_stats(
        s_hidden, rollout.teacher_hidden.to(s_hidden.dtype), mask, run.lm_head, run.spec,
        batch.response_ids, cfg.chunk_tokens, rollout.old_logp, *target_settings(rollout.kinds, cfg, mask),
    )
    if rollout.old_logp is None and run.spec.support == "sampled":
        rollout.old_logp = stats[..., STAT_STUDENT_LOGP].detach()  # the sampler, for the rollout's later updates
    return StepLoss(masked_sequence_mean(per_token, mask, anchor_weights(rollout.kinds, run.recipe.anchor.weight)),
                    per_token, stats, mask)



def sft_rollout(run, batch: list[Example], n_off: int, rollout_index: int, timer) -> Rollout:
    """The demonstrations themselves: nothing is sampled and there is no teacher."""
    with timer("rollout"):
        seqs = demonstration_sequences(batch, run.encoder, run.tokenizer, run.stop, run.recipe.word_dropout,
                                       run.recipe.train.seed, run.recipe.word_shuffle)
    return _rollout(run, seqs, seqs, [], 0, {})


def sft_loss(run, rollout: Rollout) -> StepLoss:
    """The demonstrations' per-token negative log-likelihood under the student."""
    batch = rollout.batch
    per_token = chunked_token_nll(response_hidden(run.decoder, batch), run.lm_head, batch.response_ids,
                                  run.recipe.loss.chunk_tokens)
    return StepLoss(masked_sequence_mean(per_token, batch.response_mask), per_token, None, batch.response_mask)


METHODS = {
    Method.self_distillation: (distillation_rollout, distillation_loss),
    Method.sft: (sft_rollout, sft_loss),
}
