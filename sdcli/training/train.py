"""The training loop: one learning episode of on-policy self-distillation.

Per step, top to bottom:
    1. sample a batch of prompts
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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.training.anchors import load_anchor_prompts
from sdcli.training.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from sdcli.recipe.config import Method, Quantization, Recipe, Support, TeacherKind, dump_recipe
from sdcli.core.data import file_sha256
from sdcli.training.distributed import Ranks, current, stack_padded
from sdcli.models.episodes import (
    adapter_hashes,
    check_same_base,
    episode_meta,
    find_partial,
    list_episodes,
    model_content_hash,
    next_number,
    now_iso,
    partial_dir,
    publish,
    write_atomic,
)
from sdcli.core.errors import Interrupted, UserError
from sdcli.evaluation.evaluate import episode_eval, load_eval_plan
from sdcli.training.memory import PeakMemory, return_freed_memory_to_os
from sdcli.training.losses import (
    STAT_DISAGREE,
    STAT_STUDENT_LOGP,
    STAT_TEACHER_LOGP,
    DivergenceSpec,
    chunked_token_nll,
    masked_sequence_mean,
    packed_divergence_and_stats,
)
from sdcli.models.model import (
    add_trainable_adapter,
    enable_activation_checkpointing,
    load_base,
    resolve_model_path,
    student_train_mode,
    trainable_parameters,
)
from sdcli.models.int8_sampling import sample_in_int8
from sdcli.models.rollout import SamplingSettings, sample_responses
from sdcli.models.runlock import run_lock
from sdcli.models.sequences import PromptEncoder, TeacherPromptEncoder, eos_ids, response_hidden, score_batch, teacher_prompt_limit
from sdcli.signals import build_signal
from sdcli.signals.base import Example, TeacherView, step_teacher_views
from sdcli.models.stack import adapter_name, attach_stack, combine_frozen, save_adapter
from sdcli.training.simulator import attach_user_simulator
from sdcli.training.tensorboard import TensorBoardLog
from sdcli.training.teacher import EMA_ADAPTER, add_ema_adapter, teacher_adapters, teacher_hidden, update_ema


@contextmanager
def stop_after_step():
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint is exactly
    the state between two steps, and a resumed run matches an uninterrupted one); a second one
    stops at once."""
    import signal
    import threading

    requested = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        print("\nStopping after this step (Ctrl-C again to stop at once, losing it)...", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


class ExampleSampler:
    """Walks the examples in epochs; each epoch a fresh permutation from its own generator."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> range | torch.Tensor:
        # a range or a tensor, 8 bytes an index at most: as a list of ints, a million-example
        # epoch took ~40 MB, more than the data file's index (sdcli.core.data.LazyRecords)
        if not self.shuffle:
            return range(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(int(self._order[self.position]))
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


@dataclass
class PhaseTimer:
    memory: PeakMemory
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self.memory.start()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.memory.stop(name)


def lr_lambda(cfg, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


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


ON_POLICY, OFF_POLICY, ANCHOR = "on", "off", "anchor"
KIND_INDEX = {ON_POLICY: 0, OFF_POLICY: 1, ANCHOR: 2}


@dataclass
class Sequence:
    """One (prompt, response) pair to learn on, and what the teacher sees for it."""

    prompt: list[int]
    response: list[int]
    view: TeacherView | None = None  # None until the context is built (and for sft)
    kind: str = ON_POLICY  # on: a sample; off: the example's own demonstration; anchor: replay
    teacher_hidden: torch.Tensor | None = None  # [T, H], anchors only: their teacher never changes



def teacher_pass(model, decoder, encoder, kept: list[Sequence], pad_id: int, device, teacher_set, anchor_set) -> torch.Tensor:
    """[N, T, H] teacher hidden states for `kept`, in order: the episode's teacher for the task's
    sequences, the model as the episode began for the anchors (one pass when they are the same).
    `encoder` is the TeacherPromptEncoder; an anchor's teacher sees exactly the student's prompt."""
    cached = [i for i, q in enumerate(kept) if q.teacher_hidden is not None]
    groups = [[i for i, q in enumerate(kept) if q.kind != ANCHOR], [i for i, q in enumerate(kept) if q.kind == ANCHOR]]
    if teacher_set == anchor_set:
        groups = [list(range(len(kept))), []]
    width = max(1, max(len(q.response) for q in kept))
    size = next((q.teacher_hidden.shape[-1] for q in kept if q.teacher_hidden is not None), None)
    hidden = None
    for group, adapters in zip(groups, (teacher_set, anchor_set)):
        group = [i for i in group if i not in cached]
        if not group:
            continue
        prompts = [kept[i].prompt if kept[i].kind == ANCHOR else encoder.encode(kept[i].view) for i in group]
        batch = score_batch(prompts, [kept[i].response for i in group], pad_id, device)
        part = teacher_hidden(model, decoder, batch, adapters)
        if hidden is None:
            hidden = part.new_zeros((len(kept), width, part.shape[-1]))
        hidden[group, : part.shape[1]] = part
    for i in cached:
        h = kept[i].teacher_hidden
        if hidden is None:
            hidden = h.new_zeros((len(kept), width, size))
        hidden[i, : h.shape[0]] = h
    return hidden


def off_policy_count(fraction: float, prompts: int, rollout_index: int) -> int:
    """How many of this rollout's prompts go off-policy, so that over rollouts the share is exactly
    `fraction` even when fraction x prompts is not a whole number (0.3 x 4: 1, 1, 2, 1, 1, 2, ...)."""
    before = math.floor(fraction * prompts * rollout_index + 1e-9)
    return math.floor(fraction * prompts * (rollout_index + 1) + 1e-9) - before


def off_policy_sequences(batch: list[Example], n_off: int, signal, encoder, tokenizer, stop) -> tuple[list[Sequence], list[Example]]:
    """The first `n_off` examples of the batch that carry a demonstration, as off-policy sequences
    (the demonstration is the response, the signal says what the teacher sees); and the rest, to sample."""
    off, rest = [], []
    for ex in batch:
        found = signal.demonstration_view(ex) if len(off) < n_off else None
        if found is None:
            rest.append(ex)
            continue
        text, view = found
        off.append(Sequence(encoder.encode(ex.prompt), response_tokens(tokenizer, text, stop), view, OFF_POLICY))
    return off, rest


def rollout_sequences(batch: list[Example], g: int, encoder, tokenizer, stop, sample) -> tuple[list[Sequence], int]:
    """g responses per example: logged ones where every example has one (offline), else sampled
    from the student by `sample(prompts)`. Returns the sequences and how many tokens were generated."""
    prompts = [encoder.encode(ex.prompt) for ex in batch for _ in range(g)]
    if not prompts:
        return [], 0
    if all(ex.response is not None for ex in batch):
        responses = [response_tokens(tokenizer, ex.response, stop) for ex in batch for _ in range(g)]
        generated = 0
    else:
        responses = sample(prompts)
        generated = sum(len(r) for r in responses)
    return [Sequence(p, r) for p, r in zip(prompts, responses)], generated


def answer_anchors(prompts: list, encoder, sample, seed: int, device) -> list[Sequence]:
    """The model's own answers to the anchor prompts, sampled once as the episode begins (the
    episode's adapter is still zero, so this is the teacher's model). The teacher scores them with
    no context: on these prompts the student is held to the model it started from. Sampled from a
    generator forked off the seed, so training draws the same numbers with or without anchors and
    a resumed run regenerates the same anchors."""
    encoded = [encoder.encode(p) for p in prompts]
    devices = [device.index or 0] if device.type == "cuda" else []
    responses: list[list[int]] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919)
        for start in range(0, len(encoded), 16):
            responses += sample(encoded[start : start + 16])
    return [Sequence(p, r, TeacherView(messages=m), ANCHOR) for p, r, m in zip(encoded, responses, prompts) if r]


@torch.no_grad()
def cache_anchor_teacher(model, decoder, anchors: list[Sequence], pad_id: int, device, adapters: list[str]) -> None:
    """Score the anchors under their teacher once: the model as the episode began never changes, so
    its [T, H] hidden states per anchor (a few MB) replace a teacher pass at every step."""
    for start in range(0, len(anchors), 16):
        chunk = anchors[start : start + 16]
        batch = score_batch([q.prompt for q in chunk], [q.response for q in chunk], pad_id, device)
        hidden = teacher_hidden(model, decoder, batch, adapters)
        for q, h in zip(chunk, hidden):
            q.teacher_hidden = h[: len(q.response)].clone()


def take_anchors(anchors: list[Sequence], k: int, rollout_index: int) -> list[Sequence]:
    """k anchors per rollout, walking the set in order (every anchor equally often)."""
    if not anchors or k == 0:
        return []
    return [anchors[(rollout_index * k + j) % len(anchors)] for j in range(k)]


def teacher_temperatures(kinds: torch.Tensor, temperature: float, mask: torch.Tensor) -> torch.Tensor | None:
    """[N, T] the teacher's temperature at each response position: `temperature` on task
    sequences, 1 on anchors (they hold the starting model as it is); None when all are 1."""
    if temperature == 1.0:
        return None
    rows = torch.where(kinds == KIND_INDEX[ANCHOR], 1.0, temperature)
    return rows.to(torch.float32).unsqueeze(1).expand(mask.shape)


def demonstration_text(ex: Example) -> str:
    return ex.fields.get("demonstration") or ex.response


def _masked_mean(values: torch.Tensor | None, mask: torch.Tensor | None) -> float:
    if values is None or mask is None or not bool(mask.any()):
        return float("nan")
    return float((values.detach() * mask).sum() / mask.sum())


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
    out = {"learn/disagreement": _masked_mean(stats[..., STAT_DISAGREE], mask)}
    if bool(on_mask.any()):
        advantage = stats[..., STAT_TEACHER_LOGP] - stats[..., STAT_STUDENT_LOGP]
        out.update({
            "loss/on_policy": float(masked_sequence_mean(per_token.detach(), on_mask)),
            "advantage/mean": _masked_mean(advantage, on_mask),
            "advantage/large_fraction": _masked_mean((advantage.abs() > 1).float(), on_mask),
            "advantage/positive_fraction": _masked_mean((advantage > 0).float(), on_mask),
        })
    if bool(off_mask.any()):
        out.update({
            "loss/off_policy": float(masked_sequence_mean(per_token.detach(), off_mask)),
            "learn/demo_nll_student": -_masked_mean(stats[..., STAT_STUDENT_LOGP], off_mask),
            "learn/demo_nll_teacher": -_masked_mean(stats[..., STAT_TEACHER_LOGP], off_mask),
        })
    if bool(anchor_mask.any()):
        out["loss/anchor"] = float(masked_sequence_mean(per_token.detach(), anchor_mask))
    return out


@dataclass
class EpisodeResult:
    path: Path
    steps: int
    final: dict


def load_examples(recipe: Recipe, log) -> tuple:
    """The signal's context builder and its examples; every data problem is raised before a model loads."""
    signal = build_signal(recipe.signal)
    if hasattr(signal, "check"):
        signal.check()  # user reward / environment functions import and fit
    report = signal.load(recipe.data.path)
    examples = report.examples[: recipe.data.max_examples] if recipe.data.max_examples else report.examples
    for reason, count in report.skipped.items():
        log(f"data: skipped {count} example(s): {reason}")
    for warning in report.warnings:
        log(f"data: {warning}")
    if recipe.method is Method.sft and any("demonstration" not in e.fields and e.response is None for e in examples):
        raise UserError("method: sft needs a demonstration (or logged response) for every example.")
    log(f"data: {len(examples)} example(s) from {recipe.data.path}")
    return signal, report, examples


def open_episode_folder(run_dir: Path, name: str, resume: bool) -> tuple[Path, int]:
    """The `.partial-NNN-name` folder this episode writes into: a new one, or the interrupted one."""
    partial = find_partial(run_dir, name) if resume else None
    if resume and partial is None:
        raise UserError(f"--resume: no interrupted episode named '{name}' in {run_dir}/episodes.")
    if partial is not None:
        return partial, int(partial.name.split("-")[1])
    number = next_number(run_dir)
    partial = partial_dir(run_dir, number, name)
    if partial.exists():
        raise UserError(f"{partial} exists from an interrupted run.", hint="Add --resume to continue it, or delete it.")
    partial.mkdir(parents=True)
    return partial, number


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
    run_dir = Path(recipe.run_dir)

    signal, report, examples = load_examples(recipe, log)
    anchor_prompts = (
        load_anchor_prompts(recipe.anchor.path)
        if recipe.anchor.prompts_per_step and recipe.method is Method.self_distillation else []
    )
    eval_plan = load_eval_plan(recipe)  # read now: a bad eval line must not wait for the end of training
    parents = list_episodes(run_dir)
    base_path = resolve_model_path(recipe.model.name_or_path).resolve()
    base_hash = model_content_hash(base_path, run_dir) if dist.is_main else None  # rank 0 checks, writes the cache
    if dist.is_main:
        check_same_base(parents, base_path, base_hash, allow=allow_mixed_base, log=log)  # before any folder is made
    partial, number = dist.from_main(open_episode_folder(run_dir, recipe.name, resume) if dist.is_main else None)

    # --- model: base + earlier episodes (frozen) + this episode's adapter -----------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    loaded = load_base(recipe.model, dist.device)
    tokenizer, device = loaded.tokenizer, loaded.device
    model, earlier = attach_stack(loaded.model, [p.path for p in parents])
    if len(earlier) > 1:
        earlier = combine_frozen(model, earlier)  # one frozen adapter: step time stays flat as episodes accumulate
    episode = adapter_name(number)
    model = add_trainable_adapter(model, episode, recipe.lora)
    if recipe.teacher is TeacherKind.ema:
        add_ema_adapter(model, episode, recipe.lora)
    checkpointed = enable_activation_checkpointing(model, float(cfg.gradient_checkpointing))
    decoder = model.get_base_model().get_decoder()
    lm_head = model.get_base_model().get_output_embeddings()
    params = trainable_parameters(model)
    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema_params = {n: p for n, p in model.named_parameters() if f".{EMA_ADAPTER}." in n}
    log(
        f"model: {loaded.path} ({loaded.dtype}, {recipe.model.quantization.value}, {device.type}); "
        f"{len(parents)} earlier adapter(s); {sum(p.numel() for p in params):,} trainable parameters; "
        f"{checkpointed} layer(s) with activation checkpointing"
    )

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.total_steps(len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    sampler = ExampleSampler(len(examples), cfg.seed, recipe.data.shuffle)
    encoder = PromptEncoder(tokenizer, recipe.model.max_prompt_tokens)
    teacher_encoder = TeacherPromptEncoder(
        tokenizer,
        teacher_prompt_limit(recipe.model.max_teacher_prompt_tokens, loaded.model.config, recipe.rollout.max_new_tokens),
        warn=log,
    )
    stop = eos_ids(tokenizer, model)
    sampling = SamplingSettings(
        max_new_tokens=recipe.rollout.max_new_tokens,
        temperature=recipe.rollout.temperature,
        top_p=recipe.rollout.top_p,
        top_k=recipe.rollout.top_k,
        merge=recipe.rollout.merge_for_generation == "always"
        or (recipe.rollout.merge_for_generation == "auto" and recipe.model.quantization is Quantization.none),
        # the loss still scores the samples with the float student (score_batch + response_hidden below)
        int8=sample_in_int8(recipe.rollout.sample_precision, device, loaded.quantized,
                            recipe.loss.support is Support.sampled and recipe.method is Method.self_distillation),
    )
    if sampling.int8:
        log("rollout: sampling from int8 copies of the base (rollout.sample_precision); the loss scores in float")
    spec = DivergenceSpec.from_config(recipe.loss)
    attach_user_simulator(signal, model, tokenizer, loaded.model.config, log=log,  # interactions, online
                          sample=lambda prompts, settings: sample_responses(model, tokenizer, prompts, settings, stop))
    teacher_set = teacher_adapters(recipe.teacher, earlier, episode)
    anchor_set = teacher_adapters(TeacherKind.base, earlier, episode)  # anchors hold to the start
    anchors: list[Sequence] = []
    if anchor_prompts:
        anchor_sampling = dataclasses.replace(sampling, max_new_tokens=recipe.anchor.max_new_tokens)
        anchors = answer_anchors(
            anchor_prompts, encoder, lambda ps: sample_responses(model, tokenizer, ps, anchor_sampling, stop), cfg.seed, device
        )
        cache_anchor_teacher(model, decoder, anchors, tokenizer.pad_token_id, device, anchor_set)
        log(f"anchor: {len(anchors)} answer(s) to {recipe.anchor.path} prompts; {recipe.anchor.prompts_per_step} per step")

    metrics_path = partial / "metrics.jsonl"
    start_step = 0
    dist.seed_sampling(cfg.seed)  # several ranks: a sampling stream per rank
    if resume:
        start_step = restore_checkpoint(
            partial, recipe, {**named_params, **ema_params}, optimizer, scheduler, sampler, metrics_path, log, dist
        )

    if dist.is_main:
        write_atomic(partial / "recipe.yaml", dump_recipe(recipe))
    resume_key = _resume_key(recipe)  # hashed once: the data as this run read it
    dist.check_same({"recipe": resume_key["recipe"], "data sha256": resume_key["data_sha256"], "examples": len(examples),
                     "earlier episodes": [e.label for e in parents], "start step": start_step})
    dist.broadcast_parameters({**named_params, **ema_params})
    counted_in_setup = (0, 0) if dist.is_main else (encoder.truncated, teacher_encoder.cut)  # anchors: every rank
    if dist.world > 1 and cfg.prompts_per_step < dist.world:
        log(f"warning: train.prompts_per_step={cfg.prompts_per_step} is less than the {dist.world} ranks; "
            "some ranks have no prompts of their own at each step")

    def checkpoint(step: int) -> None:
        extra = dist.with_rank_rng(resume_key)  # several ranks: every rank's random state
        if dist.is_main:
            save_checkpoint(
                partial, step=step, params={**named_params, **ema_params}, optimizer=optimizer,
                scheduler=scheduler, sampler_state=sampler.state(), extra=extra,
            )

    off_fraction = recipe.rollout.off_policy_fraction if recipe.method is Method.self_distillation else 0.0
    chosen = "off_policy_fraction" in recipe.rollout.model_fields_set  # the default is silent where it cannot apply
    if chosen and off_fraction > 0 and not any(signal.demonstration_view(ex) for ex in examples[:1000]):
        log("warning: rollout.off_policy_fraction > 0, but no example carries a demonstration; every prompt is sampled")
    log(f"train: {total_steps} step(s); {cfg.updates_per_rollout} update(s) per rollout; "
        f"{off_fraction:.0%} of prompts off-policy")

    memory = PeakMemory(device)
    board = TensorBoardLog(partial / "tensorboard") if recipe.logging.tensorboard and dist.is_main else None
    started = now_iso()
    last: dict = {}
    student_train_mode(model, episode)  # LoRA dropout (if any) in the student only; the base model's own dropout off
    metrics_out = metrics_path if dist.is_main else os.devnull  # rank 0 writes the metrics
    with stop_after_step() as stop_requested, open(metrics_out, "a", encoding="utf-8") as metrics_file:
        step = start_step
        while step < total_steps:
            timer = PhaseTimer(memory)
            step_start = time.perf_counter()
            batch = [examples[i] for i in sampler.take(cfg.prompts_per_step)]
            n_off = off_policy_count(off_fraction, cfg.prompts_per_step, step // cfg.updates_per_rollout)
            batch, n_off = dist.share_of_batch(batch, n_off, lambda ex: signal.demonstration_view(ex) is not None)

            # 1-3. the responses to learn on, and what the teacher sees for each
            with timer("rollout"):
                if recipe.method is Method.sft:
                    seqs = [Sequence(encoder.encode(ex.prompt), response_tokens(tokenizer, demonstration_text(ex), stop))
                            for ex in batch]
                    generated = 0
                else:
                    seqs, on_policy = off_policy_sequences(batch, n_off, signal, encoder, tokenizer, stop)
                    seqs_on, generated = rollout_sequences(
                        on_policy, recipe.rollout.num_samples, encoder, tokenizer, stop,
                        lambda prompts: sample_responses(model, tokenizer, prompts, sampling, stop),
                    )
            if recipe.method is Method.self_distillation:
                with timer("context"):
                    g = recipe.rollout.num_samples
                    texts = tokenizer.batch_decode([q.response for q in seqs_on], skip_special_tokens=True)
                    for q, view in zip(seqs_on, step_teacher_views(signal, on_policy, texts, g)):
                        q.view = view
                    seqs = seqs_on + seqs + dist.split(take_anchors(
                        anchors, recipe.anchor.prompts_per_step, step // cfg.updates_per_rollout
                    ))
            views = [q.view for q in seqs if q.view is not None]
            kept = [q for q in seqs if recipe.method is Method.sft or q.view.messages is not None]

            # 4. teacher: no grad, episode adapter off, context on (once per rollout)
            t_hidden, cut_before = None, teacher_encoder.cut
            if kept and recipe.method is Method.self_distillation:
                with timer("teacher"):
                    t_hidden = teacher_pass(model, decoder, teacher_encoder, kept, tokenizer.pad_token_id, device,
                                            teacher_set, anchor_set)
            teacher_cut = {"signal/teacher_prompts_cut": teacher_encoder.cut - cut_before} if views else {}
            s_batch = (score_batch([q.prompt for q in kept], [q.response for q in kept], tokenizer.pad_token_id, device)
                       if kept else None)
            kinds = torch.tensor([KIND_INDEX[q.kind] for q in kept], dtype=torch.long, device=device)
            old_logp = None

            for update in range(min(cfg.updates_per_rollout, total_steps - step)):
                # 5-6. student forward and the loss; 7. backward
                with timer("student"):
                    if s_batch is None:
                        loss, per_token, stats, mask = torch.zeros((), device=device), None, None, None
                    elif recipe.method is Method.sft:
                        mask = s_batch.response_mask
                        per_token = chunked_token_nll(response_hidden(decoder, s_batch), lm_head, s_batch.response_ids,
                                                      recipe.loss.chunk_tokens)
                        loss, stats = masked_sequence_mean(per_token, mask), None
                        loss.backward()
                    else:
                        mask = s_batch.response_mask.clone()
                        mask[:, : recipe.loss.skip_first_tokens] = False
                        s_hidden = response_hidden(decoder, s_batch)
                        per_token, stats = packed_divergence_and_stats(
                            s_hidden, t_hidden.to(s_hidden.dtype), mask, lm_head, spec,
                            s_batch.response_ids, recipe.loss.chunk_tokens, old_logp,
                            teacher_temperatures(kinds, recipe.loss.teacher_temperature, mask),
                        )
                        del s_hidden
                        loss = masked_sequence_mean(per_token, mask)
                        loss.backward()
                        if old_logp is None and spec.support == "sampled":
                            old_logp = stats[..., STAT_STUDENT_LOGP].detach()  # the sampler, for later updates

                if dist.world > 1:
                    with timer("sync"):  # every rank: the global batch's gradient; and its figures for the log
                        shares = dist.average_gradients(params, _step_figures(
                            per_token, stats, mask, kinds, views, seqs, generated, teacher_cut))

                # 7. optimiser step on the LoRA parameters only
                with timer("optimizer"):
                    grad_norm = (
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else _grad_norm(params)
                    )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if recipe.teacher is TeacherKind.ema:
                        update_ema(model, episode, cfg.ema_decay)

                # 8. log
                step += 1
                step_seconds = time.perf_counter() - step_start
                last = {
                    "step": step,
                    "steps_total": total_steps,
                    "loss": float(loss.detach()),
                    "kl": _masked_mean(per_token, mask) if recipe.method is Method.self_distillation else float("nan"),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "response/mean_tokens": sum(len(q.response) for q in seqs) / max(1, len(seqs)),
                    "tokens_per_s": generated / step_seconds,
                    "rollout/tokens_per_s": generated / max(1e-9, timer.seconds.get("rollout", 0.0)),
                    "rollout/update": update,
                    **learning_metrics(per_token, stats, mask, kinds),
                    **{f"time/{k}_s": round(v, 4) for k, v in timer.seconds.items()},
                    "time/step_s": round(step_seconds, 4),
                    **{f"memory/{k}_peak_mb": round(v, 1) for k, v in memory.peaks_mb.items()},
                    **(signal_metrics(views) if views else {}),
                    **teacher_cut,
                }
                if dist.world > 1:
                    last.update(global_step_metrics(shares, recipe.method, step_seconds, timer.seconds.get("rollout", 0.0)))
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if board:
                    board.write(step, last)
                memory.peaks_mb.clear()
                if progress:
                    progress(step, last)
                del per_token, stats
                timer, step_start, generated = PhaseTimer(memory), time.perf_counter(), 0  # the next update's phases

            del t_hidden, s_batch
            # checkpoints and Ctrl-C only between rollouts: a checkpoint holds no half-used rollout
            if dist.any_rank(stop_requested()) and step < total_steps:
                checkpoint(step)
                raise Interrupted(
                    f"Interrupted after step {step} of {total_steps}; the state is saved in {partial}.\n"
                    "Continue with the same command plus --resume."
                )
            crossed = cfg.checkpoint_every and step // cfg.checkpoint_every > (step - update - 1) // cfg.checkpoint_every
            if crossed and step < total_steps:
                checkpoint(step)

    memory.close()
    if board:
        board.close()
    truncated, cut = dist.totals(encoder.truncated - counted_in_setup[0], teacher_encoder.cut - counted_in_setup[1])
    if not dist.is_main:  # rank 0 saves, evaluates and publishes; the others wait for it
        return EpisodeResult(path=dist.from_main(None), steps=total_steps, final=last)
    if truncated:
        log(f"warning: {truncated} prompt(s) were longer than model.max_prompt_tokens and were cut from the left")
    if cut:
        log(f"warning: {cut} teacher prompt(s) were longer than {teacher_encoder.max_tokens} tokens "
            "and had their context cut")

    # --- save: adapter, then metadata, then one rename makes the episode visible -----------
    save_adapter(model, episode, partial)
    meta = episode_meta(
        number=number, name=recipe.name, recipe=recipe, base_path=loaded.path,
        base_hash=base_hash, data_hash=file_sha256(recipe.data.path), parents=parents,
        started=started, steps=total_steps, final=last, **adapter_hashes(partial),
        extra={"prompts_truncated": truncated, "teacher_prompts_cut": cut, "data_skipped": report.skipped,
               "recipe_file": str(recipe_file) if recipe_file else None},
    )
    meta.update(episode_eval(
        eval_plan, model, tokenizer, earlier=earlier, episode=episode, folder=partial,
        max_prompt_tokens=recipe.model.max_prompt_tokens, merge=sampling.merge, log=log,
    ))
    write_atomic(partial / "episode.json", json.dumps(meta, indent=2))
    final = dist.from_main(publish(partial))
    return EpisodeResult(path=final, steps=total_steps, final=last)


def restore_checkpoint(partial: Path, recipe: Recipe, params: dict, optimizer, scheduler, sampler, metrics_path: Path, log,
                       dist: Ranks | None = None) -> int:
    """Put the interrupted episode's state back; returns the step to continue from. Every rank
    reads the checkpoint; rank 0 alone rewrites the metrics."""
    dist = dist or Ranks()
    state = load_checkpoint(partial)
    if state is None:
        log(f"resume: {partial.name} has no checkpoint; starting it from step 0")
        if dist.is_main:
            metrics_path.unlink(missing_ok=True)
        return 0
    key = _resume_key(recipe)
    if state["extra"].get("recipe") != key["recipe"]:
        raise UserError(
            f"--resume: the recipe differs from the one {partial.name} was started with "
            "(only train.max_steps or train.epochs may change on resume).",
            hint=f"Compare with {partial / 'recipe.yaml'}, or delete {partial} to start over.",
        )
    then = state["extra"].get("data_sha256")  # absent in checkpoints written before it was recorded
    if then is not None and then != key["data_sha256"]:
        raise UserError(
            f"--resume: the data file {recipe.data.path} changed since {partial.name} was started "
            f"(sha256 {then[:12]}... then, {key['data_sha256'][:12]}... now); the rest of the run would "
            "continue on other examples than its first steps.",
            hint=f"Put the original data file back, or delete {partial} to start over.",
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.restore(state["sampler"])
    rng = dist.own_rng(state, log)
    if rng is not None:
        set_rng_state(rng)
    step = state["step"]
    if dist.is_main:
        lines = metrics_path.read_text().splitlines()[:step] if metrics_path.exists() else []
        write_atomic(metrics_path, "".join(line + "\n" for line in lines))
    log(f"resume: continuing {partial.name} from step {step}")
    return step


def _resume_key(recipe: Recipe) -> dict[str, str]:
    """Everything that must match for a resumed run to continue the same trajectory: the recipe
    (budget aside) and the data file's content, which the recipe names only by path."""
    recipe_text = dump_recipe(
        recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": None, "epochs": None})})
    )
    return {"recipe": recipe_text, "data_sha256": file_sha256(recipe.data.path)}


def response_tokens(tokenizer, text: str, stop: set[int]) -> list[int]:
    """A logged or demonstrated response as the tokens the student would have produced, with EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop)
    return ids + [eos]


def _step_figures(per_token, stats, mask, kinds, views, seqs, generated, teacher_cut) -> dict:
    """What a rank sends the others after its backward pass: the number of sequences its loss
    averaged over (the weight of its gradient), and the inputs of the step's log line."""
    def cpu(t):
        return None if t is None else t.detach().cpu()

    return {
        "sequences": 0 if mask is None else int((mask.sum(-1) > 0).sum()),
        "per_token": cpu(per_token), "stats": cpu(stats), "mask": cpu(mask), "kinds": cpu(kinds),
        "views": [TeacherView(messages=[] if v.messages is not None else None, reward=v.reward, success=v.success)
                  for v in views],
        "lengths": [len(q.response) for q in seqs],
        "generated": generated,
        "teacher_cut": teacher_cut.get("signal/teacher_prompts_cut", 0),
    }


def global_step_metrics(shares: list[dict], method: Method, step_seconds: float, rollout_seconds: float) -> dict:
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
        "loss": float(masked_sequence_mean(per_token, mask)) if per_token is not None else 0.0,
        "kl": _masked_mean(per_token, mask) if method is Method.self_distillation else float("nan"),
        "response/mean_tokens": sum(lengths) / max(1, len(lengths)),
        "tokens_per_s": generated / step_seconds,
        "rollout/tokens_per_s": generated / max(1e-9, rollout_seconds),
        **learning_metrics(per_token, stats, mask, kinds),
        **(signal_metrics(views) if views else {}),
        **({"signal/teacher_prompts_cut": sum(s["teacher_cut"] for s in shares)} if views else {}),
    }


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())
