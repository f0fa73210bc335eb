"""The teacher's own answers to demonstrated prompts: the fact in the model's own words.

A demonstration puts a fact in one sentence, its own. Learned off-policy on that sentence alone,
the student recalls the fact after the demonstration's words but not in the sentences it writes
itself (README, "Teacher answers"). So for every example that carries a demonstration the teacher
(the same model with the demonstration in its prompt) writes `rollout.teacher_answers` answers,
once, the first time a batch holds the example; the example's off-policy visits then learn on the
demonstration and on these in turn (visit e takes response e mod (answers + 1), the demonstration
first). The teacher scores them as it scores the demonstration, with the context.

The answers of a batch are written together, from a random stream seeded by the seed and the
rollout (the caller's stays untouched), before the batch is shared among ranks: every rank holds
the same answers. A checkpoint carries them, so a resumed run learns on the same ones.
"""

from __future__ import annotations

import dataclasses

import torch

from sdcli.models.stack import active_adapters
from sdcli.signals.base import Example


class TeacherAnswers:
    """The answers written so far, keyed by the example and its demonstration."""

    def __init__(self, per_example: int, temperature: float, max_new_tokens: int, seed: int):
        self.per_example = per_example if temperature > 0 else min(per_example, 1)  # greedy writes one
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.written: dict[tuple[str, str], list[list[int]]] = {}

    def write(self, run, batch: list[Example], n_off: int, rollout_index: int) -> int:
        """Write the answers of the batch's off-policy examples (its first `n_off` that carry a
        demonstration, as sdcli.training.batch.off_policy_sequences takes them) that have none yet,
        with the teacher's adapters (run.teacher_set). Returns how many answers were written."""
        if not self.per_example:
            return 0
        carriers = [(ex, found) for ex in batch if (found := run.signal.demonstration_view(ex)) is not None][:n_off]
        new: dict[tuple[str, str], object] = {}
        for ex, (text, view) in carriers:
            if (ex.id, text) not in self.written:
                new.setdefault((ex.id, text), view)
        if not new:
            return 0
        prompts = [prompt for view in new.values() for prompt in [run.teacher_encoder.encode(view)] * self.per_example]
        settings = dataclasses.replace(run.sampling, temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        device = run.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + 104_729 + rollout_index)
            with active_adapters(run.model, run.teacher_set):
                responses = run.sample(prompts, settings)
        for i, key in enumerate(new):
            own = responses[i * self.per_example : (i + 1) * self.per_example]
            self.written[key] = [list(r) for j, r in enumerate(own) if r and r not in own[:j]]  # distinct, not empty
        return len(responses)

    def response_for(self, example: Example, demonstration: str, demonstration_tokens: list[int]) -> list[int]:
        """The response this visit of `example` learns on: the demonstration, then each answer, in turn."""
        choices = [demonstration_tokens, *self.written.get((example.id, demonstration), [])]
        return choices[example.visit % len(choices)]

    def state(self) -> list:
        """For a checkpoint: plain lists (it is read back with weights_only)."""
        return [[key[0], key[1], answers] for key, answers in self.written.items()]

    def restore(self, state: list) -> None:
        self.written = {(example_id, demonstration): answers for example_id, demonstration, answers in state}
