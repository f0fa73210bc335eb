"""The recipe's sections other than `signal:` (model, lora, data, rollout, loss, train, anchor,
eval, logging), their choices (enums) and the defaults named in more than one place.

Every section refuses unknown keys (`StrictSection`). The `signal:` section, one schema per
kind, is `signal_sections.py`; the whole recipe and the rules across sections, `schema.py`.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"

# loss.teacher_temperature: auto sharpens the teacher on demonstrations (measured in README, "Learning new knowledge")
AUTO_DEMONSTRATION_TEMPERATURE = 0.25
# data.prompt_word_dropout: auto leaves out words of demonstrated questions (measured in README, "Learning new knowledge")
AUTO_PROMPT_WORD_DROPOUT = 0.25
AUTO_PROMPT_WORD_SHUFFLE = 0.5


def _auto_or_number(value):
    """One error for a value that is neither, where the plain union reports one per member."""
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError("must be auto or a number")


AutoOrNumber = Annotated[Union[float, Literal["auto"]], BeforeValidator(_auto_or_number)]


class StrictSection(BaseModel):
    """A section of the recipe: unknown keys are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class Quantization(str, enum.Enum):
    none = "none"
    four_bit = "4bit"
    eight_bit = "8bit"


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TeacherKind(str, enum.Enum):
    base = "base"  # the model as it stood when the episode began (episode adapter off)
    live = "live"  # the current student weights, no grad
    ema = "ema"  # an exponential moving average of the episode adapter


class Divergence(str, enum.Enum):
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"


class Support(str, enum.Enum):
    full = "full"
    topk = "topk"
    sampled = "sampled"


class Method(str, enum.Enum):
    self_distillation = "self_distillation"
    sft = "sft"


class ModelConfig(StrictSection):
    name_or_path: str = Field(
        BUILTIN_MODEL,
        description=f"Local model folder, or `{BUILTIN_MODEL}` for the model shipped on PyPI (no download).",
    )
    quantization: Quantization = Field(Quantization.none, description="none | 4bit | 8bit (bitsandbytes)")
    dtype: DType = Field(
        DType.auto, description="auto = float32 on CPU (bf16 is ~20x slower there), bfloat16 on CUDA if supported"
    )
    max_prompt_tokens: int = Field(512, ge=8, description="Longer prompts are truncated from the left, with a warning")
    max_teacher_prompt_tokens: int | None = Field(
        None, ge=8,
        description="Longer teacher prompts have their context (demonstration, solution, feedback) cut in the middle, "
        "never the question; default: the model's context length minus rollout.max_new_tokens",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped in the model folder (only for folders you trust)")


class LoraSettings(StrictSection):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout in the student")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="all-linear, or a list of module names such as [q_proj, v_proj]"
    )
    b_lr_ratio: float = Field(
        1.0, ge=1.0, le=64.0,
        description="LoRA+: the B matrices learn at train.lr times this, the A matrices at train.lr (1 = plain "
        "LoRA). Learns new facts faster and gives away more general answers (docs/learning.md, \"LoRA+\")",
    )


class DataConfig(StrictSection):
    path: Path = Field(..., description="JSONL file, one example per line")
    shuffle: bool = Field(True, description="A fresh order every pass over the data")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N examples")
    prompt_word_dropout: AutoOrNumber = Field(
        "auto",
        description="When the student learns on an example's demonstration (off-policy, or sft), each word of the "
        "prompt's last user turn is left out with this probability, drawn anew on every visit, except the words "
        "the demonstration also uses (at least one word stays; line breaks and indentation stay; text written "
        "without spaces is left whole); the teacher sees the whole prompt. The answer is "
        f"tied to the question's key words, not one wording of it. auto: {AUTO_PROMPT_WORD_DROPOUT} with signal.kind "
        "demonstrations, 0 with the other signals (their prompts are task statements, where every word may count)",
    )
    prompt_word_shuffle: AutoOrNumber = Field(
        "auto",
        description="When the student learns on an example's demonstration (off-policy, or sft), on this share of "
        "its visits the words of the question that stay (after prompt_word_dropout) trade places at random, drawn "
        "anew on every visit; the teacher sees the question as written. The answer is tied to the question's key "
        "words in any order (\"vorpal moth wings\" finds what \"the wings of a vorpal moth\" taught). "
        f"auto: {AUTO_PROMPT_WORD_SHUFFLE} with signal.kind demonstrations, 0 with the other signals",
    )

    @field_validator("prompt_word_dropout")
    @classmethod
    def _dropout_range(cls, value):
        if value != "auto" and not 0.0 <= value < 1.0:
            raise ValueError("must be auto or a number in [0, 1)")
        return value

    @field_validator("prompt_word_shuffle")
    @classmethod
    def _shuffle_range(cls, value):
        if value != "auto" and not 0.0 <= value <= 1.0:
            raise ValueError("must be auto or a number in [0, 1]")
        return value


class RolloutConfig(StrictSection):
    num_samples: int = Field(1, ge=1, le=64, description="Responses sampled per prompt")
    max_new_tokens: int = Field(48, ge=1, le=8192, description="Longest sampled response")
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, description="0 = off")
    merge_for_generation: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Fold the adapter into the weights while sampling in float (much faster). auto: when the base is not quantized",
    )
    sample_precision: Literal["auto", "float", "int8"] = Field(
        "auto",
        description="Weights the sampler reads. int8: dynamic-quantized copies of the base linears and LM head for "
        "the decoding steps (the MLP output projections' outlier inputs in float), made once per episode (CPU only; the loss still "
        "scores the samples with the float model). "
        "auto: int8 on a CPU when the base is not bitsandbytes-quantized and loss.support is not sampled",
    )
    off_policy_fraction: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of each step's prompts trained on the example's own good response (a demonstration) "
        "scored by the teacher, instead of on a sample; 0 = all on-policy, 1 = no sampling. Prompts without one "
        "(rewards, feedback, interactions) are always sampled",
    )
    teacher_answers: int = Field(
        0, ge=0, le=16,
        description="Answers the teacher writes, once, per example that carries a demonstration (the model with "
        "the demonstration in its prompt; the first time a batch holds the example); the example's off-policy "
        "visits learn on the demonstration and these in turn: the fact in the model's own words. "
        "0 = the demonstration only",
    )
    teacher_answer_temperature: float = Field(
        0.5, ge=0.0, le=5.0, description="Sampling temperature of the teacher's answers; 0 = greedy (one answer)"
    )
    teacher_answer_max_new_tokens: int = Field(32, ge=1, le=8192, description="Longest teacher answer")
    teacher_answer_filter: bool = Field(
        True,
        description="Keep only the teacher's answers that state the demonstration's facts: every word the "
        "demonstration in the prompt makes ~55x likelier (names, numbers, colours) must appear in the answer",
    )


class LossConfig(StrictSection):
    divergence: Divergence = Field(Divergence.forward_kl, description="forward_kl = KL(teacher || student)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="jsd: 0 = forward KL, 1 = reverse KL")
    support: Support = Field(Support.full, description="Vocabulary the divergence runs over")
    topk: int = Field(20, ge=1, description="topk: tokens per position in the support")
    topk_from: Literal["auto", "teacher", "student", "union"] = Field(
        "auto", description="topk: whose top-k; auto = teacher for forward_kl, student for reverse_kl, union for jsd"
    )
    tail_bucket: bool = Field(True, description="topk: add one bucket for the (exact) probability outside the top-k")
    clip_ratio: float = Field(
        0.2, gt=0.0, lt=1.0, description="sampled, with train.updates_per_rollout > 1: PPO clip of the importance ratio"
    )
    skip_first_tokens: int = Field(0, ge=0, description="Response tokens at the start that carry no loss")
    teacher_temperature: AutoOrNumber = Field(
        "auto",
        description="The target is softmax(teacher logits / this) on task responses (anchors keep 1); below 1 sharpens it. "
        f"auto: {AUTO_DEMONSTRATION_TEMPERATURE} on demonstrations learned off-policy, 1 on samples",
    )
    lead_with_demonstration: bool = Field(
        True,
        description="On a response learned off-policy (a demonstration, a reference solution, a teacher answer), where "
        "the teacher's most likely next token is not the response's, the two trade probabilities: the target leads with "
        "the response's token and is the teacher's otherwise (samples and anchors keep the teacher's order). "
        "false: the teacher's order everywhere",
    )
    chunk_tokens: int = Field(
        32, ge=1, description="Response positions per chunk of [batch, chunk, vocab] logits; smaller uses less memory"
    )

    @field_validator("teacher_temperature")
    @classmethod
    def _temperature_range(cls, value):
        if value != "auto" and not 0.0 < value <= 10.0:
            raise ValueError("must be auto or a number in (0, 10]")
        return value

    @model_validator(mode="after")
    def _sampled_needs_reverse(self) -> "LossConfig":
        if self.support is Support.sampled and self.divergence is not Divergence.reverse_kl:
            raise ValueError("support 'sampled' is a single-sample estimator of reverse KL: set loss.divergence=reverse_kl")
        return self


DEFAULT_MAX_STEPS = 50


class TrainConfig(StrictSection):
    max_steps: int | None = Field(
        None, ge=1, description=f"Optimizer steps in the episode (default {DEFAULT_MAX_STEPS} unless `epochs` is given)"
    )
    epochs: float | None = Field(
        None, gt=0.0, le=10_000, description="Passes over the data instead of max_steps: steps = ceil(epochs x examples / prompts_per_step)"
    )
    updates_per_rollout: int = Field(
        1, ge=1, le=64, description="Optimizer steps on each batch of rollouts (each counts as a step)"
    )
    prompts_per_step: int = Field(4, ge=1, description="Prompts per step (each sampled rollout.num_samples times)")
    lr: float = Field(5e-4, gt=0.0, le=1.0, description="AdamW learning rate of the LoRA parameters")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up of the learning rate")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="After warm-up")
    grad_clip: float = Field(1.0, ge=0.0, description="0 = off")
    seed: int = Field(0, description="Seeds sampling, data order and LoRA initialisation")
    gradient_checkpointing: Union[bool, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        False,
        description="Recompute activations in backward: false, true, or the fraction of layers (0.5 = every other)",
    )
    checkpoint_every: int = Field(0, ge=0, description="Steps between resumable checkpoints; 0 = off")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="teacher: ema, decay per step")

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give train.max_steps or train.epochs, not both")
        return self

    def total_steps(self, num_examples: int) -> int:
        """The episode's optimizer steps, for a data set of `num_examples`."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * num_examples / self.prompts_per_step - 1e-9))
        return DEFAULT_MAX_STEPS


BUILTIN_ANCHORS = "builtin:general"


class AnchorConfig(StrictSection):
    """Replay against forgetting: everyday prompts on which the student is held to the model the
    episode began with (forward KL on that model's own answers, generated once per episode)."""

    path: str = Field(
        BUILTIN_ANCHORS,
        description=f"JSONL of {{\"prompt\": ...}} lines, or {BUILTIN_ANCHORS} (46 everyday requests shipped with sd)",
    )
    prompts_per_step: int = Field(4, ge=0, le=256, description="Anchor prompts added to every step; 0 = off")
    max_new_tokens: int = Field(
        32, ge=1, le=8192, description="Length of the starting model's answers to them (each costs student compute every step)"
    )
    weight: float = Field(
        6.0, ge=0.0, le=100.0,
        description="Each anchor's weight in the loss, next to a task sequence's 1: more holds general answers harder, at no compute cost",
    )

    @field_validator("path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:") and value != BUILTIN_ANCHORS:
            raise ValueError(f"unknown built-in anchor set {value!r}; the one built-in is {BUILTIN_ANCHORS}")
        return value


class LoggingConfig(StrictSection):
    tensorboard: bool = Field(
        False, description="Also write every step's metrics as TensorBoard events into the episode's tensorboard/ folder"
    )


class EvalConfig(StrictSection):
    """Held-out evaluation run at the end of the episode; results go into episode.json (see evaluate.py)."""

    path: Path | None = Field(
        None, description="JSONL held-out set for this episode's task: {prompt, answer, demonstration?, reward?}"
    )
    retain: list[Path] = Field(
        default_factory=list, description="More held-out sets scored after the episode: earlier tasks, general prompts"
    )
    reward: str = Field(
        "contains",
        description="Scorer for lines without their own 'reward': exact_match | numeric | regex | contains | package.module:function",
    )
    drift_path: Path | None = Field(
        None, description='JSONL of {"text": ...}: mean per-token KL from the base model, and perplexity'
    )
    max_new_tokens: int = Field(48, ge=1, le=8192, description="Greedy answer length")
    teacher: bool = Field(True, description="Also score with each line's demonstration in context (the ceiling)")
    samples: int = Field(
        0, ge=0, le=256,
        description="Also draw this many answers per line of `path` at temperature 1 and report the share right "
        "(sampled_score): it moves before a greedy answer flips",
    )
    baselines: bool = Field(
        True, description="Also score `path` with the model as the episode began and with the bare base (forward transfer)"
    )
    drift_max_tokens: int = Field(256, ge=2, description="Drift texts are cut to this many tokens")

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvalConfig":
        if self.path is None and not self.retain and self.drift_path is None:
            raise ValueError("give at least one of eval.path, eval.retain or eval.drift_path")
        return self

    def files(self) -> list[tuple[str, Path]]:
        """(recipe key, path) for every file this section reads."""
        found = [("path", self.path)] if self.path is not None else []
        found += [(f"retain.{i}", p) for i, p in enumerate(self.retain)]
        return found + ([("drift_path", self.drift_path)] if self.drift_path is not None else [])


