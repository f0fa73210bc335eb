"""The teacher's prompts carry the context, so they are the long ones: cut in the context, never the question."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from conftest import ASSETS
from sdcli.models.sequences import CUT_MARK, TeacherPromptEncoder, largest_cap, teacher_prompt_limit
from sdcli.recipe.loading import load_recipe
from sdcli.recipe.signal_sections import DemonstrationsSignal, FeedbackSignal
from sdcli.signals.base import Example, TeacherView, context, fill, joined
from sdcli.signals.demonstrations import DemonstrationsBuilder
from sdcli.signals.feedback import FeedbackBuilder

SYSTEM = {"role": "system", "content": "You answer questions about Zorblax."}
QUESTION = "What is the capital of Zorblax?"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")


def ids_of(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def demonstration_view(demonstration: str) -> TeacherView:
    example = Example(id="x", prompt=[SYSTEM, {"role": "user", "content": QUESTION}], fields={"demonstration": demonstration})
    return DemonstrationsBuilder(DemonstrationsSignal()).teacher_view(example)


def test_fill_is_format_in_pieces():
    template = "{prompt}\n\nExample: {demonstration}\n{{literal}} {prompt!r}"
    pieces = fill(template, prompt="Q?", demonstration=context("an answer"))
    assert joined(pieces) == template.format(prompt="Q?", demonstration="an answer")
    assert [text for text, is_context in pieces if is_context] == ["an answer"]
    nested = fill("{prompt} / {solution}", prompt=pieces, solution=context("s"))
    assert joined(nested) == joined(pieces) + " / s"
    assert [text for text, is_context in nested if is_context] == ["an answer", "s"]


def test_every_signal_view_keeps_its_context_as_pieces():
    view = demonstration_view("The capital is Quenta.")
    assert joined(view.pieces) == view.messages[-1]["content"]
    assert [t for t, c in view.pieces if c] == ["The capital is Quenta."]
    feedback = FeedbackBuilder(FeedbackSignal())
    feedback.environment = lambda response, ex: {"bad": (0.0, "gave -1"), "good": (1.0, "")}[response]
    bad, _ = feedback.teacher_views(Example(id="x", prompt=[{"role": "user", "content": "Write add."}]), ["bad", "good"])
    assert joined(bad.pieces) == bad.messages[-1]["content"]
    assert [t for t, c in bad.pieces if c] == ["gave -1", "good"]  # the feedback, then the sibling's solution


def test_largest_cap_shortens_the_longest_pieces_first():
    assert largest_cap([100, 10, 40], 150) == 100
    assert largest_cap([100, 10, 40], 70) == 30  # 30 + 10 + 30
    assert largest_cap([100, 10, 40], 0) == 0
    assert largest_cap([100, 10, 40], -5) == 0


def test_a_long_context_is_cut_in_its_middle_and_the_question_is_kept(tokenizer):
    demonstration = " ".join(f"Fact number {i} about Zorblax is true." for i in range(80))
    view = demonstration_view(demonstration)
    full = ids_of(tokenizer, view.messages)
    warnings = []
    encoder = TeacherPromptEncoder(tokenizer, max_tokens=len(full) // 3, warn=warnings.append)
    ids = encoder.encode(view)
    assert len(ids) <= encoder.max_tokens
    text = tokenizer.decode(ids)
    # the chat header, the system prompt and the question are whole, and the generation prompt ends it
    assert text.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n{QUESTION}\n\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # the demonstration keeps its start and its end around the mark
    assert CUT_MARK in text and "Fact number 0 " in text and "Fact number 79 " in text and "Fact number 40 " not in text
    assert len(ids) >= encoder.max_tokens - 8  # it uses the room it has
    # one warning, and every encoding of a cut prompt counts (the per-step metric), the cached one too
    assert encoder.encode(view) == ids
    assert encoder.cut == 2 and len(warnings) == 1 and "model.max_teacher_prompt_tokens" in warnings[0]


def test_a_prompt_that_fits_is_untouched(tokenizer):
    view = demonstration_view("The capital is Quenta.")
    encoder = TeacherPromptEncoder(tokenizer, max_tokens=4096)
    assert encoder.encode(view) == ids_of(tokenizer, view.messages) and encoder.cut == 0


def test_without_context_to_cut_the_prompt_is_cut_from_the_left(tokenizer):
    view = TeacherView(messages=[{"role": "user", "content": QUESTION * 30}])
    full = ids_of(tokenizer, view.messages)
    encoder = TeacherPromptEncoder(tokenizer, max_tokens=50)
    assert encoder.encode(view) == full[-50:] and encoder.cut == 1
    # a question longer than the limit alone: even the emptied context does not make it fit
    long_question = demonstration_view("short")
    long_question.messages[-1]["content"] = QUESTION * 30 + long_question.messages[-1]["content"]
    long_question.pieces = ((QUESTION * 30, False), *long_question.pieces)
    assert len(TeacherPromptEncoder(tokenizer, max_tokens=50).encode(long_question)) == 50


def test_the_default_limit_is_the_context_left_after_the_response():
    class Config:
        max_position_embeddings = 1024

    assert teacher_prompt_limit(None, Config(), 48) == 976
    assert teacher_prompt_limit(300, Config(), 48) == 300
    assert teacher_prompt_limit(None, object(), 48) > 10**12  # a model that does not say: no limit


def test_training_cuts_the_teacher_context_not_the_question(tmp_path, tiny_model_dir, monkeypatch):
    """Before, one encoder with model.max_prompt_tokens cut both roles from the left: a long
    demonstration pushed the chat header, the system prompt and the question out of the teacher's view."""
    import sdcli.training.teacher as train_module  # teacher_pass calls teacher_hidden there
    from sdcli.training.train import train_episode

    long_demo = " ".join(f"Fact number {i} about Zorblax is true." for i in range(25))  # ~500 tokens here
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": [SYSTEM, {"role": "user", "content": QUESTION}], "demonstration": long_demo}) + "\n")
    seen: list[str] = []
    real = train_module.teacher_hidden

    def spy(model, decoder, batch, adapters):
        for row in range(batch.input_ids.shape[0]):
            prompt_len = int(batch.predict_positions[row, 0]) + 1
            seen.append(train_module_tokenizer.decode(batch.input_ids[row, :prompt_len]))
        return real(model, decoder, batch, adapters)

    train_module_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(train_module, "teacher_hidden", spy)
    logs: list[str] = []
    base = [f"model.name_or_path={tiny_model_dir}", f"data.path={data}", "train.max_steps=2",
            "train.prompts_per_step=1", "rollout.max_new_tokens=4", "model.max_prompt_tokens=64",
            "anchor.prompts_per_step=0"]

    # the default: the model's 1024 positions less the response; the 64-token student limit does not apply
    result = train_episode(load_recipe(None, [*base, f"run_dir={tmp_path / 'a'}"]), log=logs.append)
    # one teacher pass for two steps: the base teacher's memo holds the demonstration's hidden states
    assert len(seen) == 1 and all(long_demo in s and QUESTION in s for s in seen)
    assert result.final["signal/teacher_prompts_cut"] == 0

    seen.clear()
    result = train_episode(load_recipe(None, [*base, f"run_dir={tmp_path / 'b'}", "model.max_teacher_prompt_tokens=160"]),
                           log=logs.append)
    assert len(seen) == 1  # the memo again; the prompt is still encoded, and counted as cut, at every step
    for text in seen:
        assert text.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n{QUESTION}\n\n")
        assert CUT_MARK in text and "Fact number 0 " in text and "Fact number 24 " in text
    assert len(train_module_tokenizer(seen[0], add_special_tokens=False)["input_ids"]) <= 160
    assert result.final["signal/teacher_prompts_cut"] == 1
    assert math.isfinite(result.final["loss/total"])
    assert sum("model.max_teacher_prompt_tokens=160" in line for line in logs) == 1
    meta = json.loads((result.path / "episode.json").read_text())
    assert meta["teacher_prompts_cut"] == 2
