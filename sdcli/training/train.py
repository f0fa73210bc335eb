"""The training loop: one learning episode of on-policy self-distillation.

Per step, top to bottom:
    1. sample a batch of prompts; the teacher writes its own answers to those with a demonstration
       that it has not answered yet (off-policy visits learn on them and the demonstration in turn)
    2. rollout:  y ~ student(. | x)                    (no grad, adapters folded in for speed)
    3. context:  the signal builds the teacher's view c for every (x, y)
    4. teacher:  hidden states of teacher(. | x, c, y<t) (no grad, episode adapter off)
    5. student:  hidden states of student(. | x, y<t)    (grad on the episode's LoRA only)
    6. loss:     per-token D(student || teacher) over response tokens, chunked over positions
    7. backward(), clip, optimizer.step(), scheduler.step(), zero_grad()
    8. log metrics, checkpoint if due
At the end the adapter is saved into a new episode folder, which appears atomically.

`method: sft` replaces 2-6 by the negative log-likelihood of the demonstration under the student:
the supervised baseline on the same data, LoRA and optimiser.

Where the parts live: the setup (model, data, optimizer, schedule, resume) in
sdcli.training.setup; 1-6 for each method in sdcli.training.step (rollout and loss, one function
each); the log line in sdcli.training.metrics; Ctrl-C and SIGTERM in sdcli.training.stop_signals. The loop
and the optimizer step are here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcli.core.data import file_sha256
from sdcli.core.errors import Interrupted
from sdcli.evaluation.evaluate import episode_eval, evaluation_failed
from sdcli.core.atomic import write_atomic
from sdcli.models.episodes import adapter_hashes, episode_meta, now_iso, publish
from sdcli.models.model import student_train_mode
from sdcli.models.runlock import run_lock
from sdcli.models.stack import save_adapter
from sdcli.recipe.schema import Recipe
from sdcli.recipe.sections import TeacherKind
from sdcli.training.batch import off_policy_count
from sdcli.training.distributed import Ranks, current
from sdcli.training.memory import PeakMemory, heap_trimmed_between_layers, return_freed_memory_to_os
from sdcli.training.metrics import PhaseTimer, global_step_metrics, grad_norm, step_figures, step_metrics
from sdcli.training.setup import EpisodeState, setup_episode
from sdcli.training.step import METHODS, Rollout, StepLoss
from sdcli.training.stop_signals import (
    AfterTraining, EvaluationStopped, signal_name, stop_after_step, stop_at_once, stop_evaluation,
)
from sdcli.training.teacher import update_ema
from sdcli.training.tensorboard import TensorBoardLog


@dataclass
class EpisodeResult:
    path: Path
    steps: int
    final: dict


def train_episode(
    recipe: Recipe, *, resume: bool = False, log=None, progress=None, recipe_file: Path | None = None,
    allow_mixed_base: bool = False,
) -> EpisodeResult:
    """Run one episode described by `recipe`, holding its run_dir against other sd commands.
    `log(str)` gets human lines; `progress(step, metrics)` is called after every step.
    `allow_mixed_base` stacks earlier episodes even when they were trained on another base.
    Under torchrun (sdcli.training.distributed) rank 0 holds the lock, logs and writes; the other ranks are silent."""
    dist = current()
    if not dist.is_main:
        return _train_episode(recipe, resume=resume, log=None, progress=None, recipe_file=recipe_file,
                              allow_mixed_base=allow_mixed_base, dist=dist)
    with run_lock(recipe.run_dir, f"sd train: episode '{recipe.name}'", log):
        return _train_episode(recipe, resume=resume, log=log, progress=progress, recipe_file=recipe_file,
                              allow_mixed_base=allow_mixed_base, dist=dist)


def _train_episode(
    recipe: Recipe, *, resume: bool, log, progress, recipe_file: Path | None, allow_mixed_base: bool, dist: Ranks
) -> EpisodeResult:
    log = log or (lambda message: None)
    cfg = recipe.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return_freed_memory_to_os()
    with stop_at_once():
        run = setup_episode(recipe, resume=resume, log=log, dist=dist, allow_mixed_base=allow_mixed_base)
    make_rollout, compute_loss = METHODS[recipe.method]
    counted_in_setup = (0, 0) if dist.is_main else (run.encoder.truncated, run.teacher_encoder.cut)  # anchors: every rank

    started = now_iso()
    last: dict = {}
    student_train_mode(run.model, run.episode)  # LoRA dropout (if any) in the student only; the base model's own dropout off
    metrics_out = run.partial / "metrics.jsonl" if dist.is_main else os.devnull  # rank 0 writes the metrics
    tensorboard = recipe.logging.tensorboard and dist.is_main
    with (
        stop_after_step() as stop_requested,
        open(metrics_out, "a", encoding="utf-8") as metrics_file,
        PeakMemory(run.device) as memory,  # stops its sampling thread however the loop ends
        TensorBoardLog(run.partial / "tensorboard") if tensorboard else nullcontext() as board,
    ):
        step = run.start_step
        while step < run.total_steps:
            timer, step_start = PhaseTimer(memory), time.perf_counter()
            rollout_index = step // cfg.updates_per_rollout
            # 1. a batch of prompts, n_off of them to learn off-policy; the teacher answers the new ones
            batch = [dataclasses.replace(run.examples[i], visit=epoch) for i, epoch in run.sampler.take(cfg.prompts_per_step)]
            n_off = off_policy_count(run.off_fraction, cfg.prompts_per_step, rollout_index)
            if n_off and run.teacher_answers.per_example:
                with timer("teacher_answers"):
                    run.teacher_answers.write(run, batch, n_off, rollout_index)
            # ... and this rank's share of it
            batch, n_off = dist.share_of_batch(batch, n_off, lambda ex: run.signal.demonstration_view(ex) is not None)
            # 2-4. the responses to learn on, what the teacher sees for each, its hidden states (once per rollout)
            rollout = make_rollout(run, batch, n_off, rollout_index, timer)

            for update in range(min(cfg.updates_per_rollout, run.total_steps - step)):
                # 5-7. the loss, backward() and the optimizer step
                out, norm, shares = train_step(run, rollout, compute_loss, timer)
                step += 1
                # 8. log
                step_seconds = time.perf_counter() - step_start
                last = step_metrics(step=step, total_steps=run.total_steps, out=out, rollout=rollout,
                                    divergence=run.divergence, lr=run.scheduler.get_last_lr()[0], grad_norm=norm,
                                    update=update, timer=timer, step_seconds=step_seconds)
                if shares is not None:
                    last.update(global_step_metrics(shares, run.divergence, step_seconds, timer.seconds.get("rollout", 0.0),
                                                    run.recipe.anchor.weight))
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if board:
                    board.write(step, last)
                memory.peaks_mb.clear()
                if progress:
                    progress(step, last)
                del out
                timer, step_start, rollout.generated = PhaseTimer(memory), time.perf_counter(), 0  # the next update's phases

            del rollout
            # checkpoints and Ctrl-C only between rollouts: a checkpoint holds no half-used rollout
            if dist.any_rank(bool(stop_requested())) and step < run.total_steps:
                run.checkpoint(step)
                raise Interrupted(
                    f"Interrupted after step {step} of {run.total_steps}; the state is saved in {run.partial}.\n"
                    "Continue with the same command plus --resume.",
                    code=128 + (stop_requested() or signal.SIGINT),
                )
            crossed = cfg.checkpoint_every and step // cfg.checkpoint_every > (step - update - 1) // cfg.checkpoint_every
            if crossed and step < run.total_steps:
                run.checkpoint(step)
        asked = stop_requested()  # during the last step: nothing is left to train, so the evaluation is skipped

    with stop_evaluation(asked) as after:  # a signal from here on: publish what was trained, then stop
        truncated, cut = dist.totals(run.encoder.truncated - counted_in_setup[0], run.teacher_encoder.cut - counted_in_setup[1])
        if not dist.is_main:  # rank 0 saves, evaluates and publishes; the others wait for it, and stop as it does
            path, stopped, cut_evaluation = dist.from_main(None)
        else:
            if truncated:
                log(f"warning: {truncated} prompt(s) were longer than model.max_prompt_tokens and were cut from the left")
            if cut:
                log(f"warning: {cut} teacher prompt(s) were longer than {run.teacher_encoder.max_tokens} tokens "
                    "and had their context cut")
            if run.teacher_answers.dropped:
                log(f"teacher answers: {run.teacher_answers.dropped} of {run.teacher_answers.sampled} dropped for not "
                    "stating their demonstration's facts (rollout.teacher_answer_filter)")
            path = save_episode(run, last, started=started, recipe_file=recipe_file, truncated=truncated, cut=cut,
                                log=log, after=after)
            path, stopped, cut_evaluation = dist.from_main((path, after.signal, after.cut_evaluation))
    if stopped:
        raise Interrupted(
            f"Stopped by {signal_name(stopped)} after training: the episode is saved in {path}"
            + (", without its evaluation (`sd eval` scores it)." if cut_evaluation else "."),
            code=128 + stopped,
        )
    return EpisodeResult(path=path, steps=run.total_steps, final=last)


def train_step(run: EpisodeState, rollout: Rollout, compute_loss, timer: PhaseTimer) -> tuple[StepLoss, float, list | None]:
    """One optimizer update on `rollout`: the student's loss, backward(), clip, step, zero_grad.
    Returns the loss, the gradient norm before clipping, and under several ranks every rank's figures."""
    cfg = run.recipe.train
    # 5-6. student forward and the loss; 7. backward
    with timer("student"), heap_trimmed_between_layers(run.decoder):
        out = compute_loss(run, rollout) if rollout.batch is not None else StepLoss(torch.zeros((), device=run.device))
        if out.per_token is not None:  # nothing kept (every sample masked): no graph, the step still counts
            out.loss.backward()

    shares = None
    if run.dist.world > 1:
        with timer("sync"):  # every rank: the global batch's gradient; and its figures for the log
            shares = run.dist.average_gradients(run.params, step_figures(out, rollout))

    # 7. optimiser step on the LoRA parameters only
    with timer("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip) if cfg.grad_clip > 0 else grad_norm(run.params)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.recipe.teacher is TeacherKind.ema:
            update_ema(run.model, run.episode, cfg.ema_decay)
    return out, float(norm), shares


def _evaluated_model(run: EpisodeState, meta: dict) -> tuple[list[str], dict | None]:
    """What decides the answers of the models the evaluation scores: each adapter of the stack, by
    its weights' and config's hashes (the parents', then this episode's), and the rest (the base's
    hash, dtype, quantization, device). The key is None, so nothing is read back from earlier
    evaluations, where a hash is not known."""
    hashes = [(m.get("adapter_sha256"), m.get("adapter_config_sha256")) for m in (*(p.meta for p in run.parents), meta)]
    stack = [f"{weights}/{config}" for weights, config in hashes]
    if run.base_hash is None or not all(weights and config for weights, config in hashes):
        return stack, None
    return stack, {"base": run.base_hash, "dtype": str(run.loaded.dtype),
                   "quantization": run.recipe.model.quantization.value, "device": run.device.type}


def save_episode(run: EpisodeState, last: dict, *, started: str, recipe_file, truncated: int, cut: int, log,
                 after: AfterTraining | None = None) -> Path:
    """Save the adapter, then the metadata and evaluation; one rename makes the episode visible.
    after: a signal during the evaluation (stop_evaluation) ends it; the episode is kept without it."""
    recipe, partial = run.recipe, run.partial
    save_adapter(run.model, run.episode, partial)
    meta = episode_meta(
        number=run.number, name=recipe.name, recipe=recipe, base_path=run.loaded.path,
        base_hash=run.base_hash, data_hash=file_sha256(recipe.data.path), parents=run.parents,
        started=started, steps=run.total_steps, final=last, **adapter_hashes(partial),
        extra={"prompts_truncated": truncated, "teacher_prompts_cut": cut, "data_skipped": run.report.skipped,
               "recipe_file": str(recipe_file) if recipe_file else None},
    )
    stack, model_key = _evaluated_model(run, meta)
    after = after or AfterTraining()
    try:
        after.evaluating = True
        if after.signal and run.eval_plan is not None:  # asked to stop before the evaluation began
            raise EvaluationStopped(f"stopped by {signal_name(after.signal)}")
        evaluation = episode_eval(
            run.eval_plan, run.model, run.tokenizer, earlier=run.earlier, episode=run.episode, folder=partial,
            max_prompt_tokens=recipe.model.max_prompt_tokens, merge=run.sampling.merge, log=log,
            parents=[p.path for p in run.parents], stack=stack, model_key=model_key,
        )
        after.evaluating = False
    except EvaluationStopped as e:  # before it began, or just as it returned (inside it, episode_eval records it)
        after.evaluating, after.cut_evaluation = False, True
        evaluation = evaluation_failed(e)
    meta.update(evaluation)
    write_atomic(partial / "episode.json", json.dumps(meta, indent=2))
    return publish(partial)
