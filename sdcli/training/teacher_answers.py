"""The teacher's own answers to demonstrated prompts: the fact in the model's own words.

A demonstration puts a fact in one sentence, its own. Learned off-policy on that sentence alone,
the student recalls the fact after the demonstration's words but not in the sentences it writes
itself (docs/learning.md, "Teacher answers"). So for every example that carries a demonstration the
teacher (the same model with the demonstration in its prompt) writes `rollout.teacher_answers`
answers, once, the first time a batch holds the example; the example's off-policy visits then learn
on the demonstration and on these in turn (visit e takes response e mod (answers + 1), the
demonstration first). The teacher scores them as it scores the demonstration, with the context.

The teacher is not always right: SmolLM2-135M, given "The capital of Zorblax is Quenta.", also
wrote "The capital of Zorblax is Quentaquil." and "The Book of Vells is a classic example of literary
fiction, ...". With `rollout.teacher_answer_filter` (on by default) an answer is kept only if it
states the demonstration's facts: every word of the demonstration that the demonstration in the
prompt makes much likelier (`fact_words`) must appear in it. Which words those are is measured,
not guessed: the teacher scores the demonstration with and without it in the prompt.

The answers of a batch are written together, from a random stream seeded by the seed and the
rollout (the caller's stays untouched), before the batch is shared among ranks: every rank holds
the same answers. A checkpoint carries them, so a resumed run learns on the same ones.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from sdcli.models.stack import active_adapters
from sdcli.signals.base import Example

# A word of the demonstration is one of its facts when having the demonstration in the prompt makes
# the word at least e^4 (~55) times likelier (the log-probability gains of its tokens, summed). On
# the quickstart's and the fact benchmarks' demonstrations (SmolLM2-135M) the names, colours and
# numbers gain 4.5 to 30 nats, the sentences' other words -1.5 to 3.9 (docs/learning.md,
# "Checking the teacher's answers").
FACT_GAIN_NATS = 4.0
_WORD = re.compile(r"\S+")
_EDGE_PUNCTUATION = ".,;:!?\"'()[]{}"


def fact_words(text: str, offsets: list[tuple[int, int]], gains: list[float], min_gain: float = FACT_GAIN_NATS) -> list[str]:
    """The words of `text` that carry its facts. offsets: each token's (start, end) characters in
    `text`; gains: each token's log p(token | prompt with the demonstration) - log p(token | prompt).
    A word's gain is the sum over the tokens that overlap it. Words of one or two letters (in, of,
    a) never count: they would reject an answer for its grammar."""
    found = []
    for match in _WORD.finditer(text):
        word = match.group().strip(_EDGE_PUNCTUATION)
        if not word or (word.isalpha() and len(word) <= 2):
            continue
        start = match.start() + match.group().index(word)
        end = start + len(word)
        gain = sum(g for (a, b), g in zip(offsets, gains) if a < end and b > start)
        if gain >= min_gain and word.lower() not in (w.lower() for w in found):
            found.append(word)
    return found


def states_facts(answer: str, words: list[str]) -> bool:
    """Whether `answer` holds every one of `words` as a whole word, ignoring case."""
    return all(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", answer, flags=re.IGNORECASE) for w in words)


@torch.no_grad()
def demonstration_facts(run, example: Example, text: str, teacher_prompt: list[int]) -> list[str] | None:
    """`fact_words` of the demonstration `text`, scored by the teacher (run.teacher_set, eval mode)
    after the student's prompt and after `teacher_prompt` (the teacher's, already encoded: encoding
    it again would count a cut prompt twice); None where the tokenizer gives no character offsets
    (a slow tokenizer): then nothing can be checked."""
    from sdcli.evaluation.answer_likelihood import responses_token_nll
    from sdcli.models.model import eval_mode

    tokenizer = run.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    with eval_mode(run.model), active_adapters(run.model, run.teacher_set):
        without, with_demonstration = responses_token_nll(
            run.model, [(run.encoder.encode(example.prompt), ids), (teacher_prompt, ids)], tokenizer.pad_token_id)
    return fact_words(text, encoded["offset_mapping"], (without - with_demonstration).tolist())


class TeacherAnswers:
    """The answers written so far, keyed by the example and its demonstration."""

    def __init__(self, per_example: int, temperature: float, max_new_tokens: int, seed: int, check_facts: bool = False):
        self.per_example = per_example if temperature > 0 else min(per_example, 1)  # greedy writes one
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.check_facts = check_facts
        self.written: dict[tuple[str, str], list[list[int]]] = {}
        self.sampled = self.dropped = 0  # this process's answers, and those that did not state their facts

    def write(self, run, batch: list[Example], n_off: int, rollout_index: int) -> int:
        """Write the answers of the batch's off-policy examples (its first `n_off` that carry a
        demonstration, as sdcli.training.batch.off_policy_sequences takes them) that have none yet,
        with the teacher's adapters (run.teacher_set). Returns how many answers were written."""
        if not self.per_example:
            return 0
        carriers = [(ex, found) for ex in batch if (found := run.signal.demonstration_view(ex)) is not None][:n_off]
        new: dict[tuple[str, str], tuple[Example, object]] = {}
        for ex, (text, view) in carriers:
            if (ex.id, text) not in self.written:
                new.setdefault((ex.id, text), (ex, view))
        if not new:
            return 0
        teacher_prompts = [run.teacher_encoder.encode(view) for _, view in new.values()]
        prompts = [prompt for prompt in teacher_prompts for _ in range(self.per_example)]
        settings = dataclasses.replace(run.sampling, temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        device = run.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + 104_729 + rollout_index)
            with active_adapters(run.model, run.teacher_set):
                responses = run.sample(prompts, settings)
        self.sampled += len(responses)
        for i, (key, (example, _)) in enumerate(new.items()):
            own = responses[i * self.per_example : (i + 1) * self.per_example]
            kept = [list(r) for j, r in enumerate(own) if r and r not in own[:j]]  # distinct, not empty
            if self.check_facts:
                words = demonstration_facts(run, example, key[1], teacher_prompts[i])
                if words:
                    stated = [r for r in kept if states_facts(run.tokenizer.decode(r, skip_special_tokens=True), words)]
                    self.dropped += len(kept) - len(stated)
                    kept = stated
            self.written[key] = kept
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
