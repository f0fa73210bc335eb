"""`Recipe`: the whole recipe, its sections (`sections.py`, `signal_sections.py`) and the rules
that span several of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from sdcli.recipe.sections import (
    AUTO_PROMPT_WORD_DROPOUT,
    AUTO_PROMPT_WORD_SHUFFLE,
    AnchorConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraSettings,
    LossConfig,
    Method,
    ModelConfig,
    Quantization,
    RolloutConfig,
    StrictSection,
    Support,
    TeacherKind,
    TrainConfig,
)
from sdcli.recipe.signal_sections import DemonstrationsSignal, SignalConfig


class Recipe(StrictSection):
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

    @property
    def word_dropout(self) -> float:
        """data.prompt_word_dropout, auto resolved by the signal's kind."""
        return self._for_demonstrations(self.data.prompt_word_dropout, AUTO_PROMPT_WORD_DROPOUT)

    @property
    def word_shuffle(self) -> float:
        """data.prompt_word_shuffle, auto resolved by the signal's kind."""
        return self._for_demonstrations(self.data.prompt_word_shuffle, AUTO_PROMPT_WORD_SHUFFLE)

    def _for_demonstrations(self, share, auto: float) -> float:
        """A share of the question's words: `auto` with the demonstrations signal, 0 with the others
        (their prompts are task statements, where every word and its place may count)."""
        if share == "auto":
            return auto if self.signal.kind == "demonstrations" else 0.0
        return share

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

