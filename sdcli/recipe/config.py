"""Recipe schema, loading, command-line overrides and validation.

A recipe is a YAML file validated into `Recipe`. Precedence is defaults < YAML < `key=value`
on the command line. Every problem (unknown key, wrong type, out-of-range value, missing file)
is collected and reported at once, each with the file and line it comes from, as a `RecipeError`
(exit code 2).

Relative paths under `data:` / `eval:` / `anchor:` in a YAML file are resolved against the recipe's folder, so a
recipe and its data travel together; paths given on the command line, and `run_dir`, are
relative to the current directory.
"""

from __future__ import annotations

import difflib
import enum
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdcli.core.data import read_text
from sdcli.core.errors import RecipeError

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"

# loss.teacher_temperature: auto sharpens the teacher on demonstrations (measured in README, "Learning new knowledge")
AUTO_DEMONSTRATION_TEMPERATURE = 0.5

DEFAULT_DEMONSTRATION_TEMPLATE = (
    "{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{demonstration}\n\n"
    "Now answer with a response of your own."
)
DEFAULT_SOLUTION_TEMPLATE = (
    "{prompt}\n\n"
    "Here is a correct solution to this problem:\n"
    "{solution}\n\n"
    "Now solve the problem yourself, correctly."
)
DEFAULT_FEEDBACK_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier attempt at this task failed. Here is the feedback from running it:\n"
    "{feedback}\n\n"
    "Now solve the task correctly, avoiding that mistake."
)
DEFAULT_SUCCESS_FEEDBACK_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier attempt at this task succeeded. Here is the feedback from running it:\n"
    "{feedback}\n\n"
    "Now solve the task correctly."
)
DEFAULT_HINDSIGHT_TEMPLATE = (
    "{prompt}\n\n"
    "An earlier answer to this message was not good enough. This is what the user said in "
    "reply to it:\n"
    "{followup}\n\n"
    "Taking that reply into account, give an improved answer to the user's message."
)
DEFAULT_SIMULATOR_TEMPLATE = (
    "You are the user in a conversation with an AI assistant. Write the user's next message.\n\n"
    "The conversation so far:\n"
    "{conversation}\n\n"
    "The assistant's latest reply:\n"
    "{response}\n\n"
    "What the user wants, as shown by what they said next in the real conversation (to an earlier "
    "version of that reply):\n"
    "{followup}\n\n"
    "Write the user's next message, reacting to the assistant's latest reply above with that intent. "
    "If the reply already gives the user what they want, say so briefly. Write only the message."
)


class _Strict(BaseModel):
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


class ModelConfig(_Strict):
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


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout in the student")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="all-linear, or a list of module names such as [q_proj, v_proj]"
    )


class DemonstrationsSignal(_Strict):
    kind: Literal["demonstrations"] = Field("demonstrations", description="The teacher sees an example answer")
    teacher_template: str = Field(
        DEFAULT_DEMONSTRATION_TEMPLATE, description="Teacher's user turn; fields {prompt} and {demonstration}"
    )

    @field_validator("teacher_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"demonstration"}, allowed={"prompt", "demonstration"})


class RewardsSignal(_Strict):
    kind: Literal["rewards"] = Field("rewards", description="The teacher sees a successful sibling sample")
    reward: str = Field(
        "exact_match", description="exact_match | numeric | regex | contains | package.module:function"
    )
    tolerance: float = Field(1e-6, ge=0, description="numeric: absolute tolerance")
    pattern: str | None = Field(None, description="regex: pattern the response must match (else the example's `answer`)")
    case_sensitive: bool = Field(False, description="Built-in rewards compare case")
    success_threshold: float = Field(1.0, description="A sample with reward >= this is a success")
    skip_successful: bool = Field(False, description="Samples that already succeeded contribute no loss")
    strip_thinking: bool = Field(True, description="Remove <think>...</think> from sibling demonstrations")
    solution_template: str = Field(DEFAULT_SOLUTION_TEMPLATE, description="Teacher's user turn; {prompt} and {solution}")

    @field_validator("solution_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"solution"}, allowed={"prompt", "solution"})


class SandboxLimits(_Strict):
    wall_seconds: float = Field(10.0, gt=0, le=600, description="Wall-clock limit per run")
    cpu_seconds: int = Field(10, ge=1, le=600, description="CPU-time limit (RLIMIT_CPU)")
    memory_mb: int = Field(512, ge=32, description="Address-space limit (RLIMIT_AS)")
    output_bytes: int = Field(64_000, ge=1024, description="stdout + stderr kept; more kills the run")
    max_processes: int = Field(16, ge=1, description="Per sandbox; stops fork bombs")


class FeedbackSignal(_Strict):
    kind: Literal["feedback"] = Field("feedback", description="The teacher sees the environment's feedback on the sample")
    environment: str = Field("python_tests", description="python_tests | package.module:function")
    success_threshold: float = Field(1.0, description="A sample with reward >= this passed")
    use_successful_sibling: bool = Field(True, description="Also show a successful sibling's answer")
    skip_successful: bool = Field(False, description="Samples that passed contribute no loss")
    strip_thinking: bool = Field(True, description="Remove <think>...</think> from a sibling's answer")
    feedback_template: str = Field(
        DEFAULT_FEEDBACK_TEMPLATE, description="For a sample that failed; {prompt}, {feedback}, optional {solution}"
    )
    success_template: str = Field(
        DEFAULT_SUCCESS_FEEDBACK_TEMPLATE,
        description="For a sample that passed and still has feedback; {prompt}, {feedback}, optional {solution}",
    )
    solution_template: str = Field(DEFAULT_SOLUTION_TEMPLATE, description="Used for a passing sibling")
    max_feedback_chars: int = Field(1500, ge=100, description="Feedback text is cut to this length")
    sandbox: SandboxLimits = SandboxLimits()

    @field_validator("feedback_template", "success_template")
    @classmethod
    def _feedback_fields(cls, v: str) -> str:
        return _check_template(v, required={"feedback"}, allowed={"prompt", "feedback", "solution"})

    @field_validator("solution_template")
    @classmethod
    def _solution_fields(cls, v: str) -> str:
        return _check_template(v, required={"solution"}, allowed={"prompt", "solution"})


class UserSimulator(_Strict):
    template: str = Field(
        DEFAULT_SIMULATOR_TEMPLATE,
        description="The simulator's user turn; {response} (the student's sample) and {followup} (the logged "
        "follow-up, as the user's intent), optional {conversation} (the history and the user's message) and {prompt}",
    )
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Longest simulated follow-up, in tokens")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy (repeatable); above 0, sampled")

    @field_validator("template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"response", "followup"}, allowed={"conversation", "prompt", "response", "followup"})


class InteractionsSignal(_Strict):
    kind: Literal["interactions"] = Field("interactions", description="The teacher sees the user's next message")
    mode: Literal["online", "online_logged_followup", "offline"] = Field(
        "online",
        description="online: y is sampled from the student and a user simulator (the base model, every adapter off) "
        "writes the follow-up to y that the teacher sees; online_logged_followup: y is sampled, the teacher sees the "
        "logged follow-up, which answered the logged reply, not y (cheaper: no simulator); offline: the logged reply "
        "is y (off-policy, nothing generated)",
    )
    simulator: UserSimulator = UserSimulator()
    hindsight_template: str = Field(DEFAULT_HINDSIGHT_TEMPLATE, description="{prompt}, {followup}, optional {response}")
    min_followup_chars: int = Field(0, ge=0, description="Shorter follow-ups are skipped (counted)")
    max_history_messages: int | None = Field(
        None, ge=1, description="Keep at most this many messages before the prompt (oldest dropped; system kept)"
    )
    include: str | None = Field(None, description="Regex the follow-up must match")
    exclude: str | None = Field(None, description="Regex the follow-up must not match")

    @field_validator("hindsight_template")
    @classmethod
    def _fields(cls, v: str) -> str:
        return _check_template(v, required={"followup"}, allowed={"prompt", "followup", "response"})

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v


# The signal kinds, each with its section's schema: the one list of them. The context builder of a
# kind is `sdcli.signals.<kind>` (sdcli.signals.build_signal).
SIGNAL_CLASSES: dict[str, type[BaseModel]] = {
    cls.model_fields["kind"].default: cls for cls in (DemonstrationsSignal, RewardsSignal, FeedbackSignal, InteractionsSignal)
}
SIGNAL_KINDS = tuple(SIGNAL_CLASSES)
SignalConfig = Annotated[Union[tuple(SIGNAL_CLASSES.values())], Field(discriminator="kind")]


class DataConfig(_Strict):
    path: Path = Field(..., description="JSONL file, one example per line")
    shuffle: bool = Field(True, description="A fresh order every pass over the data")
    max_examples: int | None = Field(None, ge=1, description="Use only the first N examples")


class RolloutConfig(_Strict):
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
        description="Weights the sampler reads. int8: dynamic-quantized copies of the base linears (not the MLP "
        "output projections) and LM head for the decoding steps, made once per episode (CPU only; the loss still "
        "scores the samples with the float model). "
        "auto: int8 on a CPU when the base is not bitsandbytes-quantized and loss.support is not sampled",
    )
    off_policy_fraction: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of each step's prompts trained on the example's own good response (a demonstration) "
        "scored by the teacher, instead of on a sample; 0 = all on-policy, 1 = no sampling. Prompts without one "
        "(rewards, feedback, interactions) are always sampled",
    )


class LossConfig(_Strict):
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
    teacher_temperature: float | Literal["auto"] = Field(
        "auto",
        description="The target is softmax(teacher logits / this) on task responses (anchors keep 1); below 1 sharpens it. "
        f"auto: {AUTO_DEMONSTRATION_TEMPERATURE} on demonstrations learned off-policy, 1 on samples",
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


class TrainConfig(_Strict):
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


class AnchorConfig(_Strict):
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


class LoggingConfig(_Strict):
    tensorboard: bool = Field(
        False, description="Also write every step's metrics as TensorBoard events into the episode's tensorboard/ folder"
    )


class EvalConfig(_Strict):
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


class Recipe(_Strict):
    name: str = Field(
        "episode", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64, description="Episode name: the folder is NNN-name"
    )
    run_dir: Path = Field(Path("runs/default"), description="Episodes stack up in run_dir/episodes (relative to the current folder)")
    method: Method = Field(Method.self_distillation, description="sft = supervised baseline on the demonstrations")
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    signal: SignalConfig = DemonstrationsSignal()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    teacher: TeacherKind = Field(
        TeacherKind.base, description="base: the model as the episode began; live: the student; ema: EMA of the adapter"
    )
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    anchor: AnchorConfig = AnchorConfig()
    eval: EvalConfig | None = None
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_signal_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("signal"), dict) and "kind" not in data["signal"]:
            data = {**data, "signal": {"kind": "demonstrations", **data["signal"]}}
        return data

    @model_validator(mode="after")
    def _siblings_need_samples(self) -> "Recipe":
        needs_sibling = self.signal.kind == "rewards" or (
            self.signal.kind == "feedback" and self.signal.use_successful_sibling and self.signal.skip_successful
        )
        if needs_sibling and self.rollout.num_samples < 2 and self.method is Method.self_distillation:
            raise ValueError(
                f"signal '{self.signal.kind}' teaches from a successful sibling sample, so it needs "
                "rollout.num_samples >= 2 (with 1, every sample would be masked)"
            )
        return self

    @model_validator(mode="after")
    def _sampled_needs_plain_sampling(self) -> "Recipe":
        """`sampled` support weighs each token by log p_s(y) - log p_t(y) as if y were drawn from
        p_s itself; a tempered or truncated sampler draws from another distribution, so the
        estimate (and its gradient) would be biased, and greedy decoding draws nothing at all."""
        if self.loss.support is not Support.sampled or self.method is not Method.self_distillation:
            return self
        r = self.rollout
        changed = [f"rollout.temperature={r.temperature:g}" + (" (greedy)" if r.temperature == 0 else "")] if r.temperature != 1.0 else []
        changed += [f"rollout.top_p={r.top_p:g}"] if r.top_p < 1.0 else []
        changed += [f"rollout.top_k={r.top_k}"] if r.top_k > 0 else []
        if changed:
            raise ValueError(
                "loss.support 'sampled' estimates reverse KL from tokens drawn from the student's own distribution, "
                f"but {' and '.join(changed)} sample from another one, which biases the estimate: set "
                "rollout.temperature=1, rollout.top_p=1 and rollout.top_k=0, or use loss.support=full or topk"
            )
        return self

    @model_validator(mode="after")
    def _int8_sampling_needs_a_float_base(self) -> "Recipe":
        """int8 sampling quantizes copies of float weights; a bitsandbytes base has none to copy.
        And `sampled` support needs y drawn from the student itself (as above): an int8 sampler is
        another distribution, so the estimate would be biased by their difference."""
        if self.rollout.sample_precision != "int8":
            return self
        if self.model.quantization is not Quantization.none:
            raise ValueError(
                f"rollout.sample_precision 'int8' quantizes float weights for sampling, but the base is already "
                f"model.quantization={self.model.quantization.value}: use rollout.sample_precision=float or auto"
            )
        if self.loss.support is Support.sampled and self.method is Method.self_distillation:
            raise ValueError(
                "loss.support 'sampled' estimates reverse KL from tokens drawn from the student itself, but "
                "rollout.sample_precision=int8 draws them from an int8 copy of it, which biases the estimate: "
                "use rollout.sample_precision=float or auto (auto samples in float with this support), or loss.support=full or topk"
            )
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _check_template(template: str, required: set[str], allowed: set[str]) -> str:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    unknown = names - allowed
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - names
    if missing:
        raise ValueError(f"must contain {', '.join('{' + m + '}' for m in sorted(missing))}")
    return template


# ---------------------------------------------------------------------------------------------
# Loading


def _schema_at(keys: list[str], data: dict) -> tuple[str, Any, bool]:
    """What the recipe schema has at `keys`: ("section", its class, nullable), ("value", None,
    nullable) or ("unknown", None, False). The signal section is the one of the recipe's kind."""
    cls: Any = Recipe
    kind, optional = "section", False
    for key in keys:
        if kind != "section" or key not in cls.model_fields:
            return "unknown", None, False
        ann = cls.model_fields[key].annotation
        args = get_args(ann) or (ann,)
        optional = type(None) in args
        if cls is Recipe and key == "signal":
            given = data.get("signal")
            args = (SIGNAL_CLASSES.get(given.get("kind", "demonstrations") if isinstance(given, dict) else "demonstrations",
                                        DemonstrationsSignal),)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        kind, cls = ("section", models[0]) if models else ("value", None)
    return kind, cls, optional


def _check_override_shape(text: str, keys: list[str], value: Any, data: dict) -> None:
    """Refuse an override that would replace a whole section with a value (`model=x` wiped every
    key of the recipe's model: section), or that treats a value as a section."""
    key = ".".join(keys)
    kind, section, optional = _schema_at(keys, data)
    if kind == "section" and not isinstance(value, dict) and not (value is None and optional):
        example = next(iter(section.model_fields))
        raise RecipeError(
            f"Override {text!r}: '{key}' is a section of the recipe, not a value; this would replace the whole section.",
            hint=f"Set its keys one by one, e.g. {key}.{example}=..., or give a mapping, '{key}={{{example}: ...}}', "
            "which is merged into the recipe's section.",
        )
    for n in range(1, len(keys)):
        if _schema_at(keys[:n], data)[0] == "value":
            above = ".".join(keys[:n])
            raise RecipeError(f"Override {text!r}: '{above}' is a value, not a section, so it has no key '{keys[n]}'.",
                              hint=f"Write {above}=VALUE.")


def _merge_into(target: dict, value: dict) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge_into(target[k], v)
        else:
            target[k] = v


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10). The value is read as YAML."""
    if "=" not in text:
        raise RecipeError(
            f"Override {text!r} is not of the form key=value.", hint="Example: sd train recipe.yaml train.max_steps=10"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"Override {text!r} has an empty key.", hint="Example: loss.divergence=reverse_kl")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


# A recipe has a few hundred values; aliases (*name) that expand past this are a "billion laughs"
# document, which would hang anything that walks the loaded data (validation, error messages).
MAX_EXPANDED_NODES = 100_000


def _line_index(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path in a composed YAML document to its 1-based line number.

    An aliased node is walked once, at its first path; other paths through it resolve to the line of
    their alias (see `where` in `load_recipe`). Walking every path would take as long as the
    aliases' full expansion.
    """
    index: dict[tuple[str, ...], int] = {}

    def visit(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, _ in node.value:
                index[path + (str(k.value),)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[path + (str(i),)] = v.start_mark.line + 1

    if root is not None:
        _walk_once(root, visit)
    return index


def _walk_once(root: yaml.Node, visit) -> None:
    """visit(node, path) for every node of a composed document, each distinct node once, at the
    first path that reaches it: aliases are not walked again, so this takes time in the size of
    the text, not of the aliases' expansion."""
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        visit(node, path)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (str(k.value),))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (str(i),))

    walk(root, ())


def _expanded_size(root: yaml.Node) -> float:
    """How many nodes the document has once every alias is expanded (inf if an alias contains itself).
    Counted per distinct node, so this takes time in the size of the text, not of the expansion."""
    sizes: dict[int, float] = {}

    def size(node: yaml.Node) -> float:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = math.inf  # still being counted: reaching it again means a cycle
        children: list = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        sizes[id(node)] = 1 + sum(size(c) for c in children)
        return sizes[id(node)]

    return size(root)


def _duplicate_keys(root: yaml.Node, origin: str) -> list[str]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a second `train:` block
    would drop the first without a word."""
    problems: list[str] = []

    def visit(node: yaml.Node, path: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[str, int] = {}
        for k, _ in node.value:
            name = str(k.value)
            line = k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and name in first and k.tag != "tag:yaml.org,2002:merge":
                key = ".".join(path + (name,))
                problems.append(f"{origin}:{line}: duplicate key '{key}' (first at line {first[name]}); "
                                "YAML would keep only the last one. Merge them into one.")
            first.setdefault(name, line)

    _walk_once(root, visit)
    return problems


def _compose(text: str, origin: str) -> yaml.Node | None:
    """The document's node graph; RecipeError for duplicate keys or aliases that expand too far."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        expanded = _expanded_size(root) if root is not None else 0
    except RecursionError:
        raise RecipeError(f"{origin}: nested too deeply to read (thousands of levels); a recipe needs a few.") from None
    if math.isinf(expanded):
        raise RecipeError(f"{origin}: an alias (*name) refers to a node that contains it, which never ends; refusing "
                          "to load it.", hint="Write the values out instead of the alias.")
    if expanded > MAX_EXPANDED_NODES:
        raise RecipeError(
            f"{origin}: its aliases (*name) expand to {int(expanded):,} values, more than the "
            f"{MAX_EXPANDED_NODES:,} a recipe may hold; refusing to load it.",
            hint="Write the values out, or nest fewer aliases inside one another.",
        )
    if root is None:
        return None
    problems = _duplicate_keys(root, origin)
    if problems:
        raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems)
    return root


def _drop_union_tag(loc: tuple) -> tuple:
    """pydantic reports ('signal', 'rewards', 'reward'); people wrote signal.reward."""
    if len(loc) > 1 and loc[0] == "signal" and loc[1] in SIGNAL_KINDS:
        return (loc[0],) + tuple(loc[2:])
    return tuple(loc)


def _known_keys(model: type[BaseModel], path: list[str], data: dict) -> list[str]:
    """Field names valid at `path`, used for "did you mean" suggestions."""
    cls: Any = model
    for part in path:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        if part == "signal":
            kind = (data.get("signal") or {}).get("kind", "demonstrations") if isinstance(data.get("signal"), dict) else "demonstrations"
            ann = SIGNAL_CLASSES.get(kind, DemonstrationsSignal)
        models = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = models[0] if len(models) == 1 else ann  # `EvalConfig | None` -> EvalConfig
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
    return list(cls.model_fields)


def _raw_file_problems(data: dict, where) -> list[str]:
    """Missing data file / model folder, read from the raw mapping (used when validation failed)."""
    problems = []
    data_path = (data.get("data") or {}).get("path") if isinstance(data.get("data"), dict) else None
    if isinstance(data_path, str) and not Path(data_path).is_file():
        problems.append(f"{where(('data', 'path'))}: 'data.path': file not found: {data_path}")
    model_path = (data.get("model") or {}).get("name_or_path") if isinstance(data.get("model"), dict) else None
    if isinstance(model_path, str) and not model_path.startswith("builtin:") and not Path(model_path).is_dir():
        problems.append(f"{where(('model', 'name_or_path'))}: 'model.name_or_path': not a local model folder: {model_path}")
    return problems


def load_recipe(path: str | Path | None, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read, merge and validate a recipe. Raises RecipeError listing every problem."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    origin = "recipe"
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise RecipeError(f"Recipe file not found: {path}", hint="Check the path; recipes end in .yaml.")
        base_dir = path.resolve().parent
        text = read_text(path, RecipeError)
        try:
            lines = _line_index(_compose(text, origin))  # before loading: it refuses what would hang later
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, got {type(loaded).__name__}.")
        data = loaded
        for key in ("data", "eval", "anchor"):
            section = data.get(key)
            if isinstance(section, dict):
                for k, v in list(section.items()):
                    if (isinstance(v, str) and (k == "path" or k.endswith("_path")) and not Path(v).is_absolute()
                            and not v.startswith("builtin:")):
                        section[k] = str(base_dir / v)
                    elif isinstance(v, list) and k == "retain":
                        section[k] = [str(base_dir / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in v]
        if isinstance(data.get("model"), dict):
            nop = data["model"].get("name_or_path")
            if isinstance(nop, str) and nop.startswith((".", "/")) is False and not nop.startswith("builtin:"):
                candidate = base_dir / nop
                if not Path(nop).exists() and candidate.exists():
                    data["model"]["name_or_path"] = str(candidate)

    from_cli: set[tuple[str, ...]] = set()
    budget = {"max_steps": "epochs", "epochs": "max_steps"}
    for text_override in overrides:
        keys, value = parse_override(text_override)
        _check_override_shape(text_override, keys, value, data)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            _merge_into(node[keys[-1]], value)  # `model={dtype: float32}` sets one key, it keeps the others
            from_cli.update(tuple(keys) + (str(k),) for k in value)
        else:
            node[keys[-1]] = value
        from_cli.add(tuple(keys))
        if keys[:1] == ["train"] and len(keys) == 2 and keys[1] in budget:
            # one budget on the command line replaces the recipe's other one: `train.max_steps=10`
            # on a recipe that counts epochs is a shorter run, not a conflict
            node.pop(budget[keys[1]], None)

    def where(loc: tuple) -> str:
        loc = tuple(str(x) for x in loc)
        for n in range(len(loc), 0, -1):
            if loc[:n] in from_cli:
                return "command line"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{origin}:{lines[loc[:n]]}"
        return origin

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = _drop_union_tag(err["loc"])
            key = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                known = _known_keys(Recipe, [str(p) for p in loc[:-1]], data)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
                valid = f" Valid keys here: {', '.join(known)}." if known and not close else ""
                problems.append(f"{where(loc)}: unknown key '{key}'{hint}.{valid}")
            elif err["type"] == "missing":
                problems.append(f"{where(loc)}: missing required key '{key}'.")
            elif err["type"] == "enum" or err["type"] == "literal_error":
                expected = err.get("ctx", {}).get("expected", "")
                problems.append(f"{where(loc)}: '{key}' is {err.get('input')!r}; expected one of {expected}.")
            elif err["type"] == "union_tag_invalid":
                problems.append(
                    f"{where(loc)}: '{key}.kind' is {err['ctx'].get('tag')!r}; expected one of {err['ctx'].get('expected_tags')}."
                )
            elif not loc:  # a rule across several keys
                problems.append(f"{origin}: {err['msg'].removeprefix('Value error, ')}.")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{where(loc)}: '{key}': {msg} (got {err.get('input')!r}).")
        if check_files:  # files too, so that one run shows every problem
            problems += _raw_file_problems(data, where)
        raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems) from None

    if check_files:
        if not recipe.data.path.is_file():
            problems.append(f"{where(('data', 'path'))}: 'data.path': file not found: {recipe.data.path}")
        nop = recipe.model.name_or_path
        if not nop.startswith("builtin:") and not Path(nop).is_dir():
            problems.append(
                f"{where(('model', 'name_or_path'))}: 'model.name_or_path': not a local model folder: {nop} "
                f"(sd never downloads; use a folder with config.json, or {BUILTIN_MODEL})"
            )
        elif nop.startswith("builtin:") and nop != BUILTIN_MODEL:
            problems.append(f"{where(('model', 'name_or_path'))}: unknown built-in model {nop!r}; the one built-in is {BUILTIN_MODEL}")
        anchor = recipe.anchor
        if anchor.prompts_per_step and not anchor.path.startswith("builtin:") and not Path(anchor.path).is_file():
            problems.append(f"{where(('anchor', 'path'))}: 'anchor.path': file not found: {anchor.path}")
        for key, file in recipe.eval.files() if recipe.eval is not None else []:
            if not file.is_file():
                problems.append(f"{where(('eval', *key.split('.')))}: 'eval.{key}': file not found: {file}")
        from sdcli.core.outputs import folder_problem

        run_dir_problem = folder_problem(recipe.run_dir)
        if run_dir_problem:
            problems.append(f"{where(('run_dir',))}: 'run_dir': {run_dir_problem}; sd writes the episodes there "
                            "(choose another, e.g. run_dir=runs/mine)")
        if problems:
            raise RecipeError(f"{origin}: {len(problems)} problem(s) in the recipe:", problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False, allow_unicode=True)


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if args:  # a Union, written X | Y
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    return getattr(ann, "__name__", str(ann))


def recipe_reference_markdown() -> str:
    """The recipe reference table in README.md, generated from the schema (a test keeps them equal)."""

    def describe(model: type[BaseModel], prefix: str) -> list[str]:
        rows = []
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            nested = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested and name != "signal":
                rows += describe(nested[0], f"{key}.")
                continue
            if name == "signal":
                continue
            default = field.default
            if isinstance(default, enum.Enum):
                default = default.value
            if isinstance(ann, type) and issubclass(ann, enum.Enum):
                kind = " \\| ".join(m.value for m in ann)
            else:
                kind = _type_name(ann).replace("|", "\\|")
            if field.default_factory is not None:
                default = field.default_factory()
            shown = "required" if field.is_required() else f"`{default!s}`".replace("\n", "\\n")
            if isinstance(default, str) and len(default) > 40:
                shown = "(see `sd validate`)" if "{" in default else f"`{default[:37]}...`"
            doc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {kind} | {shown} | {doc} |")
        return rows

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += describe(Recipe, "")
    for signal in SIGNAL_CLASSES.values():
        lines += describe(signal, "signal.")
    return "\n".join(lines)
