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
from sdcli.models.sequences import ScoreBatch, response_hidden, score_batch
from sdcli.models.stack import active_adapters
from sdcli.recipe.sections import AUTO_DEMONSTRATION_TEMPERATURE, TeacherKind
from sdcli.training.batch import ANCHOR, KIND_INDEX, OFF_POLICY, Sequence

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


# The base teacher's hidden states kept for demonstrations it will score again (next epoch).
TEACHER_MEMO_BYTES = 256 * 2**20


class TeacherMemo:
    """The teacher's [T, H] hidden states for off-policy sequences it has scored, keyed by exactly
    what it saw (its prompt and the response ids). Only for `teacher: base`, which does not change
    during an episode, so a demonstration learned again in a later epoch reuses its first pass: the
    same numbers, without the forward. Holds at most `max_bytes`; past that, sequences are scored
    every time as before."""

    def __init__(self, max_bytes: int = TEACHER_MEMO_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: dict[tuple, torch.Tensor] = {}

    def get(self, prompt: list[int], response: list[int]) -> torch.Tensor | None:
        return self._entries.get((tuple(prompt), tuple(response)))

    def put(self, prompt: list[int], response: list[int], hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.bytes + size <= self.max_bytes:
            self._entries[(tuple(prompt), tuple(response))] = hidden.clone()
            self.bytes += size


def teacher_pass(model, decoder, encoder, kept: list[Sequence], pad_id: int, device, teacher_set, anchor_set,
                 memo: TeacherMemo | None = None) -> torch.Tensor:
    """[N, T, H] teacher hidden states for `kept`, in order: the episode's teacher for the task's
    sequences, the model as the episode began for the anchors (one pass when they are the same).
    `encoder` is the TeacherPromptEncoder; an anchor's teacher sees exactly the student's prompt.
    Anchors carry their hidden states from the start; `memo` (teacher: base) holds off-policy ones."""
    prompts = [q.prompt if q.kind == ANCHOR else encoder.encode(q.view) for q in kept]
    remembered = [memo is not None and q.kind == OFF_POLICY for q in kept]
    known = [q.teacher_hidden if q.teacher_hidden is not None else memo.get(p, q.response) if keep else None
             for q, p, keep in zip(kept, prompts, remembered)]
    groups = [[i for i, q in enumerate(kept) if q.kind != ANCHOR], [i for i, q in enumerate(kept) if q.kind == ANCHOR]]
    if teacher_set == anchor_set:
        groups = [list(range(len(kept))), []]
    width = max(1, max(len(q.response) for q in kept))
    hidden = None
    for group, adapters in zip(groups, (teacher_set, anchor_set)):
        group = [i for i in group if known[i] is None]
        if not group:
            continue
        batch = score_batch([prompts[i] for i in group], [kept[i].response for i in group], pad_id, device)
        part = teacher_hidden(model, decoder, batch, adapters)
        if hidden is None:
            hidden = part.new_zeros((len(kept), width, part.shape[-1]))
        hidden[group, : part.shape[1]] = part
        for row, i in enumerate(group):
            if remembered[i]:
                memo.put(prompts[i], kept[i].response, part[row, : len(kept[i].response)])
    for i, h in enumerate(known):
        if h is None:
            continue
        if hidden is None:
            hidden = h.new_zeros((len(kept), width, h.shape[-1]))
        hidden[i, : h.shape[0]] = h
    return hidden


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


def teacher_temperatures(kinds: torch.Tensor, temperature: float | str, mask: torch.Tensor) -> torch.Tensor | None:
    """[N, T] the teacher's temperature at each response position: `temperature` on task
    sequences, 1 on anchors (they hold the starting model as it is); "auto": the sharpening
    measured for demonstrations (AUTO_DEMONSTRATION_TEMPERATURE) on off-policy sequences only, 1 on
    samples. None when every position has temperature 1."""
    if temperature == "auto":
        rows = torch.where(kinds == KIND_INDEX[OFF_POLICY], AUTO_DEMONSTRATION_TEMPERATURE, 1.0)
    elif temperature == 1.0:
        return None
    else:
        rows = torch.where(kinds == KIND_INDEX[ANCHOR], 1.0, temperature)
    if bool((rows == 1.0).all()):
        return None
    return rows.to(torch.float32).unsqueeze(1).expand(mask.shape)


def demonstration_lead(kinds: torch.Tensor, enabled: bool, mask: torch.Tensor) -> torch.Tensor | None:
    """[N, T] bool: the positions where the target leads with the response's own token
    (loss.lead_with_demonstration): every position of the off-policy sequences. None when off, or
    when no sequence is off-policy."""
    rows = kinds == KIND_INDEX[OFF_POLICY]
    if not enabled or not bool(rows.any()):
        return None
    return rows.unsqueeze(1).expand(mask.shape)


def target_settings(kinds: torch.Tensor, loss_cfg, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """How the target is made from the teacher at each position of these sequences, for
    `packed_divergence_and_stats`: (teacher_temperature, lead) from loss.teacher_temperature and
    loss.lead_with_demonstration. One definition for the loop and `sd inspect`."""
    return (teacher_temperatures(kinds, loss_cfg.teacher_temperature, mask),
            demonstration_lead(kinds, loss_cfg.lead_with_demonstration, mask))


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
