"""An episode's setup: everything the loop needs before its first step.

In order: the signal and its examples (every data problem before a model loads), the episode
folder, the model (base + earlier episodes' adapters, frozen + this episode's trainable adapter),
the optimizer and learning-rate schedule, the encoders and sampling settings, the anchors'
answers, and on --resume the checkpoint's state. `setup_episode` returns it all as an `EpisodeState`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcli.core.errors import UserError
from sdcli.evaluation.evaluate import load_eval_plan
from sdcli.models.activation_memory import enable_activation_checkpointing, recompute_cheap_activations
from sdcli.models.episodes import (
    Episode,
    check_same_base,
    find_partial,
    list_episodes,
    model_content_hash,
    next_number,
    partial_dir,
    write_atomic,
)
from sdcli.models.model import (
    LoadedModel,
    add_trainable_adapter,
    load_base,
    resolve_model_path,
    trainable_parameters,
)
from sdcli.models.int8_sampling import sample_in_int8
from sdcli.models.rollout import SamplingSettings, sample_responses
from sdcli.models.sequences import PromptEncoder, TeacherPromptEncoder, eos_ids, teacher_prompt_limit
from sdcli.models.stack import adapter_name, attach_stack, combine_frozen
from sdcli.recipe.loading import dump_recipe
from sdcli.recipe.schema import Recipe
from sdcli.recipe.sections import Method, Quantization, Support, TeacherKind
from sdcli.signals import load_signal_data
from sdcli.training.anchors import load_anchor_prompts
from sdcli.training.batch import ExampleSampler, Sequence, answer_anchors
from sdcli.training.checkpoint import restore_checkpoint, resume_key, save_checkpoint
from sdcli.training.distributed import Ranks
from sdcli.training.losses import DivergenceSpec
from sdcli.training.simulator import attach_user_simulator
from sdcli.training.teacher_answers import TeacherAnswers
from sdcli.training.teacher import EMA_ADAPTER, TeacherMemo, add_ema_adapter, cache_anchor_teacher, teacher_adapters


@dataclass
class EpisodeState:
    """One episode's state, as the loop sees it."""

    recipe: Recipe
    dist: Ranks
    partial: Path  # the .partial-NNN-name folder it writes into
    number: int
    parents: list[Episode]  # the earlier episodes, stacked under this one
    base_hash: str | None  # rank 0 only
    signal: object
    report: object  # the data loading report (skipped lines)
    examples: list
    eval_plan: object
    loaded: LoadedModel
    model: torch.nn.Module
    earlier: list[str]  # the frozen adapters' names
    episode: str  # this episode's adapter
    decoder: torch.nn.Module
    lm_head: torch.nn.Module
    params: list[torch.nn.Parameter]  # trainable: this episode's LoRA
    saved_params: dict[str, torch.nn.Parameter]  # what a checkpoint holds: the LoRA, and the EMA teacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    sampler: ExampleSampler
    encoder: PromptEncoder
    teacher_encoder: TeacherPromptEncoder
    stop: set[int]
    sampling: SamplingSettings
    spec: DivergenceSpec
    teacher_set: list[str]  # the adapters of the task's teacher
    anchor_set: list[str]  # ... and of the anchors' teacher: the model as the episode began
    anchors: list[Sequence]
    off_fraction: float
    teacher_answers: TeacherAnswers  # the teacher's own answers to demonstrated prompts, written as met
    resume_key: dict
    teacher_memo: TeacherMemo | None = None  # teacher: base, which never changes in an episode
    start_step: int = 0

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def divergence(self) -> str | None:
        """The divergence the loss is, for the log's names; None for method: sft (an NLL)."""
        return self.spec.divergence if self.recipe.method is Method.self_distillation else None

    def sample(self, prompts: list[list[int]], settings: SamplingSettings | None = None) -> list[list[int]]:
        """Responses of the student as it is now, for token-id prompts (the rollout's settings by default)."""
        return sample_responses(self.model, self.tokenizer, prompts, settings or self.sampling, self.stop)

    def checkpoint(self, step: int) -> None:
        extra = self.dist.with_rank_rng({**self.resume_key, "teacher_answers": self.teacher_answers.state()})
        if self.dist.is_main:
            save_checkpoint(
                self.partial, step=step, params=self.saved_params, optimizer=self.optimizer,
                scheduler=self.scheduler, sampler_state=self.sampler.state(), extra=extra,
            )


def lr_lambda(cfg, total_steps: int):
    """The learning-rate factor of each step: linear warm-up from lr / warmup_steps at the first step
    to lr at step warmup_steps - 1, then constant, cosine or linear to 0 at the last step.

    Not `transformers.get_scheduler`: its warm-up starts at 0, so the first step of a run with
    warm-up would not learn, and every warm-up step would take the factor one step later than
    here; after warm-up the two agree (tests/unit/test_schedule.py compares them)."""
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


def load_examples(recipe: Recipe, log) -> tuple:
    """The signal's context builder and its examples; every data problem is raised before a model
    loads, by the same path `sd validate` takes."""
    signal, report, examples = load_signal_data(recipe, log=log)
    log(f"data: {len(examples)} example(s) from {recipe.data.path}")
    return signal, report, examples


def open_episode_folder(run_dir: Path, name: str, resume: bool, log) -> tuple[Path, int]:
    """The `.partial-NNN-name` folder this episode writes into: a new one, or the interrupted one
    (with --resume, or when its run stopped before it trained anything)."""
    partial = find_partial(run_dir, name) if resume else None
    if resume and partial is None:
        raise UserError(f"--resume: no interrupted episode named '{name}' in {run_dir}/episodes.")
    if partial is not None:
        return partial, int(partial.name.split("-")[1])
    number = next_number(run_dir)
    partial = partial_dir(run_dir, number, name)
    if partial.exists() and not trained_anything(partial):
        log(f"note: {partial.name} is from a run that stopped before its first step; starting it afresh")
        shutil.rmtree(partial)
    if partial.exists():
        raise UserError(f"{partial} exists from an interrupted run.", hint="Add --resume to continue it, or delete it.")
    partial.mkdir(parents=True)
    return partial, number


def trained_anything(partial: Path) -> bool:
    """Whether an interrupted episode's folder holds a step: a checkpoint, or a line of metrics."""
    metrics = partial / "metrics.jsonl"
    return (partial / "checkpoint").exists() or (metrics.is_file() and metrics.stat().st_size > 0)


def sampling_settings(recipe: Recipe, device: torch.device, quantized: bool) -> SamplingSettings:
    """How the student samples its responses. The loss scores every sample with the float student
    (score_batch + response_hidden), whatever precision sampled it."""
    return SamplingSettings(
        max_new_tokens=recipe.rollout.max_new_tokens,
        temperature=recipe.rollout.temperature,
        top_p=recipe.rollout.top_p,
        top_k=recipe.rollout.top_k,
        merge=recipe.rollout.merge_for_generation == "always"
        or (recipe.rollout.merge_for_generation == "auto" and recipe.model.quantization is Quantization.none),
        int8=sample_in_int8(recipe.rollout.sample_precision, device, quantized,
                            recipe.loss.support is Support.sampled and recipe.method is Method.self_distillation),
    )


def load_model(recipe: Recipe, number: int, parents: list[Episode], dist: Ranks, log) -> dict:
    """Base + earlier episodes (one frozen adapter) + this episode's trainable adapter (+ the EMA teacher's)."""
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    loaded = load_base(recipe.model, dist.device)
    model, earlier = attach_stack(loaded.model, [p.path for p in parents])
    if len(earlier) > 1:
        earlier = combine_frozen(model, earlier)  # one frozen adapter: step time stays flat as episodes accumulate
    episode = adapter_name(number)
    model = add_trainable_adapter(model, episode, recipe.lora)
    if recipe.teacher is TeacherKind.ema:
        add_ema_adapter(model, episode, recipe.lora)
    checkpointed = enable_activation_checkpointing(model, float(recipe.train.gradient_checkpointing))
    recomputing = recompute_cheap_activations(model)
    params = trainable_parameters(model)
    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema_params = {n: p for n, p in model.named_parameters() if f".{EMA_ADAPTER}." in n}
    log(
        f"model: {loaded.path} ({loaded.dtype}, {recipe.model.quantization.value}, {loaded.device.type}); "
        f"{len(parents)} earlier adapter(s); {sum(p.numel() for p in params):,} trainable parameters; "
        f"{checkpointed} layer(s) with activation checkpointing, {recomputing} recomputing their norms' outputs "
        "and MLP products in backward"
    )
    return dict(
        loaded=loaded, model=model, earlier=earlier, episode=episode, params=params,
        saved_params={**named_params, **ema_params},
        decoder=model.get_base_model().get_decoder(), lm_head=model.get_base_model().get_output_embeddings(),
    )


def lora_param_groups(model, params: list[torch.nn.Parameter], lr: float, b_lr_ratio: float) -> list[dict]:
    """AdamW's parameter groups: every trainable parameter at `lr`, except LoRA's B matrices at
    `lr * b_lr_ratio` under LoRA+ (B starts at zero and moves the output directly; A is a random
    projection that needs to move less). One group when the ratio is 1."""
    if b_lr_ratio == 1.0:
        return [{"params": params}]
    is_b = {id(p) for name, p in model.named_parameters() if ".lora_B." in name}
    return [{"params": [p for p in params if id(p) not in is_b]},
            {"params": [p for p in params if id(p) in is_b], "lr": lr * b_lr_ratio}]


def prepare_anchors(run: EpisodeState, prompts: list, log) -> None:
    """The starting model's answers to the anchor prompts, and their teacher's hidden states, once."""
    if not prompts:
        return
    recipe = run.recipe
    settings = dataclasses.replace(run.sampling, max_new_tokens=recipe.anchor.max_new_tokens)
    run.anchors = answer_anchors(prompts, run.encoder, lambda ps: run.sample(ps, settings), recipe.train.seed, run.device)
    cache_anchor_teacher(run.model, run.decoder, run.anchors, run.tokenizer.pad_token_id, run.device, run.anchor_set)
    log(f"anchor: {len(run.anchors)} answer(s) to {recipe.anchor.path} prompts; {recipe.anchor.prompts_per_step} per step")


def setup_episode(recipe: Recipe, *, resume: bool, log, dist: Ranks, allow_mixed_base: bool) -> EpisodeState:
    """Everything before the first step, in the module doc's order; rank 0 alone checks the base
    against earlier episodes and opens the episode folder, the other ranks are told which."""
    cfg, run_dir = recipe.train, Path(recipe.run_dir)
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
    partial, number = dist.from_main(open_episode_folder(run_dir, recipe.name, resume, log) if dist.is_main else None)

    m = load_model(recipe, number, parents, dist, log)
    optimizer = torch.optim.AdamW(
        lora_param_groups(m["model"], m["params"], cfg.lr, recipe.lora.b_lr_ratio), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.total_steps(len(examples))
    tokenizer, model_config = m["loaded"].tokenizer, m["loaded"].model.config
    teacher_limit = teacher_prompt_limit(recipe.model.max_teacher_prompt_tokens, model_config, recipe.rollout.max_new_tokens)
    run = EpisodeState(
        recipe=recipe, dist=dist, partial=partial, number=number, parents=parents, base_hash=base_hash,
        signal=signal, report=report, examples=examples, eval_plan=eval_plan, **m,
        optimizer=optimizer, total_steps=total_steps,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps)),
        sampler=ExampleSampler(len(examples), cfg.seed, recipe.data.shuffle),
        encoder=PromptEncoder(tokenizer, recipe.model.max_prompt_tokens),
        teacher_encoder=TeacherPromptEncoder(tokenizer, teacher_limit, warn=log),
        stop=eos_ids(tokenizer, m["model"]), sampling=sampling_settings(recipe, m["loaded"].device, m["loaded"].quantized), spec=DivergenceSpec.from_config(recipe.loss),
        teacher_set=teacher_adapters(recipe.teacher, m["earlier"], m["episode"]),
        anchor_set=teacher_adapters(TeacherKind.base, m["earlier"], m["episode"]),  # anchors hold to the start
        anchors=[], resume_key={},
        off_fraction=recipe.rollout.off_policy_fraction if recipe.method is Method.self_distillation else 0.0,
        teacher_answers=TeacherAnswers(
            recipe.rollout.teacher_answers if recipe.method is Method.self_distillation else 0,
            recipe.rollout.teacher_answer_temperature, recipe.rollout.teacher_answer_max_new_tokens, cfg.seed,
            check_facts=recipe.rollout.teacher_answer_filter,
        ),
        teacher_memo=TeacherMemo() if recipe.teacher is TeacherKind.base else None,
    )
    if run.sampling.int8:
        log("rollout: sampling from int8 copies of the base (rollout.sample_precision); the loss scores in float")
    attach_user_simulator(signal, run.model, tokenizer, model_config, log=log, sample=run.sample)  # interactions, online
    prepare_anchors(run, anchor_prompts, log)
    restore_and_check(run, resume, log)
    return run


def restore_and_check(run: EpisodeState, resume: bool, log) -> None:
    """--resume: the checkpoint's state; then the facts every rank must share, checked."""
    recipe, dist, cfg = run.recipe, run.dist, run.recipe.train
    metrics_path = run.partial / "metrics.jsonl"
    dist.seed_sampling(cfg.seed)  # several ranks: a sampling stream per rank
    if resume:
        run.start_step = restore_checkpoint(run.partial, recipe, run.saved_params, run.optimizer, run.scheduler,
                                            run.sampler, metrics_path, log, dist, run.teacher_answers)
    if dist.is_main:
        write_atomic(run.partial / "recipe.yaml", dump_recipe(recipe))
    run.resume_key = resume_key(recipe)  # hashed once: the data as this run read it
    dist.check_same({"recipe": run.resume_key["recipe"], "data sha256": run.resume_key["data_sha256"],
                     "examples": len(run.examples), "earlier episodes": [e.label for e in run.parents],
                     "start step": run.start_step})
    dist.broadcast_parameters(run.saved_params)
    if dist.world > 1 and cfg.prompts_per_step < dist.world:
        log(f"warning: train.prompts_per_step={cfg.prompts_per_step} is less than the {dist.world} ranks; "
            "some ranks have no prompts of their own at each step")
    chosen = "off_policy_fraction" in recipe.rollout.model_fields_set  # the default is silent where it cannot apply
    if chosen and run.off_fraction > 0 and not any(run.signal.demonstration_view(ex) for ex in run.examples[:1000]):
        log("warning: rollout.off_policy_fraction > 0, but no example carries a demonstration; every prompt is sampled")
    answers = run.teacher_answers.per_example if run.off_fraction > 0 else 0
    if answers and run.teacher_answers.check_facts and not getattr(run.tokenizer, "is_fast", False):
        log("warning: rollout.teacher_answer_filter cannot check the teacher's answers with this model's tokenizer "
            "(a slow tokenizer gives no character offsets); every answer is kept. A tokenizer.json beside the model "
            "gives a fast one; rollout.teacher_answer_filter=false silences this")
    log(f"train: {run.total_steps} step(s); {cfg.updates_per_rollout} update(s) per rollout; "
        f"{run.off_fraction:.0%} of prompts off-policy" + (f", {answers} teacher answer(s) per demonstration" if answers else ""))
