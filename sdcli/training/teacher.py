"""The teacher: the same weights as the student, this episode's adapter switched off, context on.

    base  the model as it stood when the episode began: base weights + earlier episodes' adapters.
    live  the current student weights (this episode's adapter on), without gradients.
    ema   earlier adapters + an exponential moving average of this episode's adapter.
          A and B are averaged separately (A_ema <- d A_ema + (1-d) A, likewise B). That is not
          the average of the update B.A (the product of averages differs from the average of
          products by a second-order term in the per-step change), but it keeps the teacher a
          rank-r adapter that costs one adapter's memory, with no dense d_out x d_in matrices.
          The adapter starts equal to the episode's (B = 0), so the EMA teacher starts as `base`.

Nothing is ever copied: the teacher forward runs the one model under `no_grad`, in eval mode, with
the right adapters active, and its hidden states are dropped as soon as the loss has used them.
"""

from __future__ import annotations

import torch

from sdcli.models.model import eval_mode
from sdcli.models.sequences import ScoreBatch, response_hidden
from sdcli.models.stack import active_adapters
from sdcli.recipe.config import TeacherKind

EMA_ADAPTER = "ema"


def teacher_adapters(kind: TeacherKind, earlier: list[str], episode: str) -> list[str]:
    if kind is TeacherKind.base:
        return list(earlier)
    if kind is TeacherKind.live:
        return [*earlier, episode]
    if kind is TeacherKind.ema:
        return [*earlier, EMA_ADAPTER]
    raise ValueError(f"unknown teacher kind {kind!r}; expected base, live or ema")


@torch.no_grad()
def teacher_hidden(model, decoder, batch: ScoreBatch, adapters: list[str]) -> torch.Tensor:
    """[N, T, H] final hidden states of the teacher at the response positions.

    In eval mode: the teacher is a fixed target, so no dropout (the live and EMA teachers' LoRA
    dropout included); the student's modes are restored afterwards."""
    with eval_mode(model), active_adapters(model, adapters):
        return response_hidden(decoder, batch)


def add_ema_adapter(model, episode: str, lora_settings) -> None:
    """Add the frozen EMA adapter, equal to the episode's; the active set stays as it was."""
    from sdcli.models.model import lora_config
    from sdcli.models.stack import set_active_adapters

    active = list(model.base_model.active_adapters)
    model.add_adapter(EMA_ADAPTER, lora_config(lora_settings))
    set_active_adapters(model, active, trainable=[episode])
    copy_adapter(model, episode, EMA_ADAPTER)


def _adapter_params(model, name: str) -> dict[str, torch.nn.Parameter]:
    marker = f".{name}."
    return {n.replace(marker, "."): p for n, p in model.named_parameters() if marker in n and "lora_" in n}


@torch.no_grad()
def copy_adapter(model, source: str, target: str) -> None:
    src, dst = _adapter_params(model, source), _adapter_params(model, target)
    for key, p in dst.items():
        p.copy_(src[key])


@torch.no_grad()
def update_ema(model, episode: str, decay: float) -> None:
    src, dst = _adapter_params(model, episode), _adapter_params(model, EMA_ADAPTER)
    for key, p in dst.items():
        p.lerp_(src[key], 1.0 - decay)
