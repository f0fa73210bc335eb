"""Interactions, online: the teacher sees a user simulator's follow-up to the student's own sample.

The simulator here is a fake callable (the signal imports no model); the loop's real one, the base
model with adapters off, is tested in tests/e2e/test_user_simulator_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdcli.recipe.loading import load_recipe
from sdcli.recipe.signal_sections import DEFAULT_HINDSIGHT_TEMPLATE, DEFAULT_SIMULATOR_TEMPLATE, InteractionsSignal
from sdcli.signals.base import TeacherView, context, context_view, fill, step_teacher_views
from sdcli.signals.interactions import EMPTY_SIMULATED_FOLLOWUP, InteractionsBuilder, clean_followup, transcript

REPO = Path(__file__).resolve().parents[2]

MATH = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 7*8?"},
    {"role": "assistant", "content": "54."},
    {"role": "user", "content": "Wrong, 7*8 is 56."},
]}
CAPITAL = {"messages": [
    {"role": "user", "content": "Capital of Australia?"},
    {"role": "assistant", "content": "Sydney."},
    {"role": "user", "content": "No, it's Canberra."},
]}
LOGGED = ["Wrong, 7*8 is 56.", "No, it's Canberra."]


def examples(tmp_path: Path, **cfg):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(MATH) + "\n" + json.dumps(CAPITAL) + "\n")
    builder = InteractionsBuilder(InteractionsSignal(**cfg))
    return builder, list(builder.load(path).examples)


class FakeSimulator:
    """Answers prompt i with replies[i] (or "simulated #i"); records every call."""

    def __init__(self, replies: list[str] | None = None):
        self.calls: list[list[TeacherView]] = []
        self.replies = replies

    def __call__(self, prompts: list[TeacherView]) -> list[str]:
        self.calls.append(prompts)
        return list(self.replies) if self.replies is not None else [f"simulated #{i}" for i in range(len(prompts))]


def forbidden(prompts):
    raise AssertionError("this mode must not ask the user simulator")


def test_online_is_the_default_mode():
    assert InteractionsSignal().mode == "online"


def test_teacher_sees_the_simulated_followup_not_the_logged_one(tmp_path):
    builder, (math_ex, _) = examples(tmp_path)
    builder.set_user_simulator(FakeSimulator(["Too long, just the number please."]))
    (view,) = builder.teacher_views(math_ex, ["Let me think. 7*8 is 56."])
    text = view.messages[-1]["content"]
    assert text == DEFAULT_HINDSIGHT_TEMPLATE.format(prompt="What is 7*8?", followup="Too long, just the number please.")
    assert "Wrong, 7*8 is 56." not in text
    assert view.messages[:-1] == [{"role": "system", "content": "Answer briefly."}]
    assert view.simulated_followup == "Too long, just the number please."
    assert view.feedback == "Too long, just the number please."  # what the teacher was told


def test_simulator_prompt_holds_the_sample_the_logged_intent_and_the_conversation(tmp_path):
    builder, (math_ex, _) = examples(tmp_path)
    fake = FakeSimulator()
    builder.set_user_simulator(fake)
    builder.teacher_views(math_ex, ["It is 54, I think.", "Fifty-six."])
    (prompts,) = fake.calls
    assert len(prompts) == 2
    for prompt, sample in zip(prompts, ["It is 54, I think.", "Fifty-six."]):
        assert [m["role"] for m in prompt.messages] == ["user"]
        text = prompt.messages[0]["content"]
        assert sample in text and "Wrong, 7*8 is 56." in text and "User: What is 7*8?" in text
        assert "Answer briefly." not in text  # the system prompt instructs the assistant, not the user
        assert text == DEFAULT_SIMULATOR_TEMPLATE.format(conversation="User: What is 7*8?", response=sample,
                                                          followup="Wrong, 7*8 is 56.")
        # the data is context (cut to fit), the instructions are not
        context = "".join(t for t, is_context in prompt.pieces if is_context)
        assert sample in context and "Wrong, 7*8 is 56." in context and "You are the user" not in context


def test_a_custom_simulator_template(tmp_path):
    builder, (math_ex, _) = examples(tmp_path, simulator={"template": "Q: {prompt}\nA: {response}\nIntent: {followup}"})
    fake = FakeSimulator()
    builder.set_user_simulator(fake)
    builder.teacher_views(math_ex, ["54"])
    assert fake.calls[0][0].messages[0]["content"] == "Q: What is 7*8?\nA: 54\nIntent: Wrong, 7*8 is 56."


def test_one_simulator_call_for_a_whole_step(tmp_path):
    builder, exs = examples(tmp_path)
    fake = FakeSimulator()
    builder.set_user_simulator(fake)
    responses = ["a1", "a2", "b1", "b2"]  # 2 samples per example
    views = step_teacher_views(builder, exs, responses, 2)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 4
    for i, (view, prompt, sample) in enumerate(zip(views, fake.calls[0], responses)):
        assert sample in prompt.messages[0]["content"]
        assert LOGGED[i // 2] in prompt.messages[0]["content"]
        assert view.simulated_followup == f"simulated #{i}"  # each sample gets the follow-up to itself
        assert f"simulated #{i}" in view.messages[-1]["content"]
    assert views[0].messages[-1]["content"].startswith("What is 7*8?")
    assert views[2].messages[-1]["content"].startswith("Capital of Australia?")


def test_hindsight_template_with_response_shows_the_sample_the_simulator_answered(tmp_path):
    builder, (math_ex, _) = examples(tmp_path, hindsight_template="You said: {response}\nThe user said: {followup}")
    builder.set_user_simulator(FakeSimulator(["Shorter."]))
    (view,) = builder.teacher_views(math_ex, ["It is 56, because 7*8=56."])
    assert view.messages[-1]["content"] == "You said: It is 56, because 7*8=56.\nThe user said: Shorter."


def test_an_empty_simulated_followup_is_masked(tmp_path):
    builder, (math_ex, _) = examples(tmp_path)
    builder.set_user_simulator(FakeSimulator(["  ", "User: Shorter."]))
    empty, labelled = builder.teacher_views(math_ex, ["x", "y"])
    assert empty.messages is None and empty.masked_reason == EMPTY_SIMULATED_FOLLOWUP and empty.simulated_followup == ""
    assert labelled.simulated_followup == "Shorter."


def test_online_without_a_simulator_says_so(tmp_path):
    builder, (math_ex, _) = examples(tmp_path)
    with pytest.raises(RuntimeError, match="user simulator"):
        builder.teacher_views(math_ex, ["x"])


def test_a_simulator_answering_the_wrong_number_of_prompts_is_an_error(tmp_path):
    builder, (math_ex, _) = examples(tmp_path)
    builder.set_user_simulator(FakeSimulator(["only one"]))
    with pytest.raises(RuntimeError, match="1 follow-up"):
        builder.teacher_views(math_ex, ["x", "y"])


def old_view(prompt: list, followup: str, response: str) -> dict:
    """What `teacher_views` gave in online (and offline) mode before the simulator, as its code was
    then: the logged follow-up in the hindsight template."""
    pieces = fill(DEFAULT_HINDSIGHT_TEMPLATE, prompt=prompt[-1]["content"], followup=context(followup),
                  response=context(response))
    view = vars(context_view(prompt, pieces, feedback=followup))
    assert view["messages"][-1]["content"] == DEFAULT_HINDSIGHT_TEMPLATE.format(prompt=prompt[-1]["content"], followup=followup)
    return view


@pytest.mark.parametrize("mode", ["online_logged_followup", "offline"])
def test_logged_followup_modes_give_the_old_views_exactly(tmp_path, mode):
    builder, exs = examples(tmp_path, mode=mode)
    builder.set_user_simulator(forbidden)
    for ex, followup in zip(exs, LOGGED):
        views = builder.teacher_views(ex, ["a sample", "another"])
        assert [vars(v) for v in views] == [old_view(ex.prompt, followup, r) for r in ["a sample", "another"]]
        assert all(v.simulated_followup is None for v in views)
        assert (ex.response is not None) == (mode == "offline")
    assert builder.needs_user_simulator is False


def test_only_online_asks_for_a_simulator():
    assert InteractionsBuilder(InteractionsSignal()).needs_user_simulator
    assert not InteractionsBuilder(InteractionsSignal(mode="offline")).needs_user_simulator
    assert not InteractionsBuilder(InteractionsSignal(mode="online_logged_followup")).needs_user_simulator


def test_describe_names_each_mode():
    assert "user simulator" in InteractionsBuilder(InteractionsSignal()).describe()
    assert "greedy, at most 64 tokens" in InteractionsBuilder(InteractionsSignal()).describe()
    assert "logged follow-up" in InteractionsBuilder(InteractionsSignal(mode="online_logged_followup")).describe()
    assert "nothing generated" in InteractionsBuilder(InteractionsSignal(mode="offline")).describe()


def test_clean_followup():
    assert clean_followup("  User: Shorter please.\n") == "Shorter please."
    assert clean_followup("Shorter please.\nAssistant: OK, 56.") == "Shorter please."
    assert clean_followup("Fine. The assistant: role is odd") == "Fine. The assistant: role is odd"
    assert transcript(MATH["messages"]) == "User: What is 7*8?\n\nAssistant: 54.\n\nUser: Wrong, 7*8 is 56."


# --- recipe keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("{followup} only", "must contain {response}"),
    ("{response} only", "must contain {followup}"),
    ("{response} {followup} {answer}", "unknown field"),
    ("{response {followup}", "not a valid template"),
])
def test_simulator_template_fields_are_checked(template, message):
    with pytest.raises(ValueError, match=message):
        InteractionsSignal(simulator={"template": template})


def test_simulator_settings_from_the_command_line():
    recipe = load_recipe(REPO / "recipes" / "interactions_online.yaml",
                         ["signal.simulator.max_new_tokens=16", "signal.simulator.temperature=0.3"], check_files=False)
    assert recipe.signal.mode == "online"
    assert (recipe.signal.simulator.max_new_tokens, recipe.signal.simulator.temperature) == (16, 0.3)
    with pytest.raises(Exception, match="mode"):
        load_recipe(REPO / "recipes" / "interactions_online.yaml", ["signal.mode=onlin"], check_files=False)


def test_braces_in_the_conversation_are_not_simulator_template_fields(tmp_path):
    path = tmp_path / "braces.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Format {x}?"}, {"role": "assistant", "content": "{x!r}"},
                                             {"role": "user", "content": "No, {{x}}."}]}) + "\n")
    builder = InteractionsBuilder(InteractionsSignal())
    fake = FakeSimulator()
    builder.set_user_simulator(fake)
    builder.teacher_views(builder.load(path).examples[0], ["Use {y}."])
    text = fake.calls[0][0].messages[0]["content"]
    assert "User: Format {x}?" in text and "Use {y}." in text and "No, {{x}}." in text


@pytest.mark.parametrize("mode, words", [
    ("online", "a user simulator (the base model, every adapter off; greedy, at most 64 tokens)"),
    ("online_logged_followup", "the teacher sees the logged follow-up, which answered the logged reply, not y"),
    ("offline", "y = the logged reply (nothing generated)"),
])
def test_validate_says_what_each_mode_does(tiny_model_dir, mode, words):
    from sdcli.validate import check_recipe

    recipe = load_recipe(REPO / "recipes" / "interactions_online.yaml", [f"model.name_or_path={tiny_model_dir}", f"signal.mode={mode}"])
    assert words in check_recipe(recipe)["mode"]


def test_readme_shows_the_default_simulator_template():
    readme = (REPO / "README.md").read_text()
    shown = "\n".join(("  " + line) if line else "" for line in DEFAULT_SIMULATOR_TEMPLATE.splitlines())
    assert f"  ```\n{shown}\n  ```" in readme
