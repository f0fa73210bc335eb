"""What a step learns on: the examples' order, and the (prompt, response) sequences of a rollout.

A sequence is one of three kinds:
    on      a response sampled from the student (or logged with the example, offline)
    off     the example's own demonstration, scored as if the student had written it
    anchor  the starting model's own answer to an everyday prompt, replayed to hold the student
            to the model it started from
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdcli.signals.base import Example, TeacherView
from sdcli.training.word_dropout import student_prompt

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

    def take(self, k: int) -> list[tuple[int, int]]:
        """The next k examples as (index, epoch): the epoch is the pass over the data each came from."""
        out = []
        for _ in range(k):
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append((int(self._order[self.position]), self.epoch))
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


def off_policy_count(fraction: float, prompts: int, rollout_index: int) -> int:
    """How many of this rollout's prompts go off-policy, so that over rollouts the share is exactly
    `fraction` even when fraction x prompts is not a whole number (0.3 x 4: 1, 1, 2, 1, 1, 2, ...)."""
    before = math.floor(fraction * prompts * rollout_index + 1e-9)
    return math.floor(fraction * prompts * (rollout_index + 1) + 1e-9) - before


def response_tokens(tokenizer, text: str, stop: set[int]) -> list[int]:
    """A logged or demonstrated response as the tokens the student would have produced, with EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop)
    return ids + [eos]


def demonstration_text(ex: Example) -> str:
    return ex.fields.get("demonstration") or ex.response


def demonstration_sequences(batch: list[Example], encoder, tokenizer, stop, word_dropout: float = 0.0,
                            seed: int = 0, word_shuffle: float = 0.0) -> list[Sequence]:
    """method: sft: every example's demonstration (or logged response) as the response to learn."""
    texts = [demonstration_text(ex) for ex in batch]
    return [Sequence(encoder.encode(student_prompt(ex, word_dropout, seed, text, word_shuffle)),
                     response_tokens(tokenizer, text, stop))
            for ex, text in zip(batch, texts)]


def off_policy_sequences(batch: list[Example], n_off: int, signal, encoder, tokenizer, stop,
                         answers=None, word_dropout: float = 0.0, seed: int = 0,
                         word_shuffle: float = 0.0) -> tuple[list[Sequence], list[Example]]:
    """The first `n_off` examples of the batch that carry a demonstration, as off-policy sequences
    (the signal says what the teacher sees); and the rest, to sample. The response is the
    demonstration, or with `answers` (sdcli.training.teacher_answers) the one its visit takes in turn.
    The student's prompt leaves out words with probability `word_dropout` and, with probability
    `word_shuffle`, puts the rest in a random order; the teacher's prompt is whole."""
    off, rest = [], []
    for ex in batch:
        found = signal.demonstration_view(ex) if len(off) < n_off else None
        if found is None:
            rest.append(ex)
            continue
        text, view = found
        response = response_tokens(tokenizer, text, stop)
        if answers is not None:
            response = answers.response_for(ex, text, response)
        student = student_prompt(ex, word_dropout, seed, text, word_shuffle)
        off.append(Sequence(encoder.encode(student), response, view, OFF_POLICY))
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


def take_anchors(anchors: list[Sequence], k: int, rollout_index: int) -> list[Sequence]:
    """k anchors per rollout, walking the set in order (every anchor equally often)."""
    if not anchors or k == 0:
        return []
    return [anchors[(rollout_index * k + j) % len(anchors)] for j in range(k)]


def anchor_weights(kinds: torch.Tensor, weight: float) -> torch.Tensor | None:
    """[N] each sequence's weight in the loss: `anchor.weight` on anchors, 1 on the task; None when all are 1."""
    if weight == 1.0:
        return None
    return torch.where(kinds == KIND_INDEX[ANCHOR], weight, 1.0)
