"""The interactions signal: parsing chat logs, extracting (prompt, reply, follow-up), filters, hindsight views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import DEFAULT_HINDSIGHT_TEMPLATE, InteractionsSignal
from sdcli.signals.interactions import InteractionsBuilder, truncate_history

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "recipes" / "data" / "interactions.jsonl"


def write(tmp_path: Path, rows: list, name: str = "log.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def oa(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def load(path: Path, **cfg):
    return InteractionsBuilder(InteractionsSignal(**cfg)).load(path)


MATH = oa(("user", "What is 7*8?"), ("assistant", "54."), ("user", "Wrong, 7*8 is 56."), ("assistant", "56."))


# --- formats ------------------------------------------------------------------------------


def test_openai_format(tmp_path):
    report = load(write(tmp_path, [MATH]))
    assert len(report.examples) == 1
    ex = report.examples[0]
    assert ex.prompt == [{"role": "user", "content": "What is 7*8?"}]
    assert ex.fields["followup"] == "Wrong, 7*8 is 56."
    assert ex.fields["logged_response"] == "54."
    assert ex.id == "log.jsonl:1#1"
    assert report.skipped == {"no_followup": 1}  # the final "56." has no follow-up


def test_sharegpt_format_maps_roles(tmp_path):
    row = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Capital of Australia?"},
        {"from": "gpt", "value": "Sydney."},
        {"from": "user", "value": "No, it's Canberra."},
        {"from": "assistant", "value": "Canberra."},
    ]}
    ex = load(write(tmp_path, [row])).examples[0]
    assert ex.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Australia?"}]
    assert ex.fields["followup"] == "No, it's Canberra."
    assert ex.fields["logged_response"] == "Sydney."


def test_formats_detected_per_line(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                  {"from": "human", "value": "say it in French"}]}
    report = load(write(tmp_path, [MATH, sharegpt]))
    assert [e.id for e in report.examples] == ["log.jsonl:1#1", "log.jsonl:2#1"]


def test_extra_keys_are_ignored(tmp_path):
    row = {"id": 7, "model": "x", "messages": [
        {"role": "user", "content": "hi", "timestamp": 1}, {"role": "assistant", "content": "yo", "name": "bot"},
        {"role": "user", "content": "be polite"}]}
    ex = load(write(tmp_path, [row])).examples[0]
    assert ex.prompt == [{"role": "user", "content": "hi"}]
    assert ex.fields["conversation_id"] == 7


# --- per-line errors ----------------------------------------------------------------------


def test_every_bad_line_reported_with_its_number(tmp_path):
    rows = [
        MATH,  # 1: fine
        {"prompt": "hi", "response": "yo"},  # 2: neither format
        {"messages": [{"from": "human", "value": "hi"}]},  # 3: ShareGPT turns under 'messages'
        oa(("user", "hi"), ("tool", "x")),  # 4: unknown role
        {"messages": [{"role": "user", "content": ["a", "b"]}]},  # 5: non-string content
        {"messages": []},  # 6: no messages
        {"conversations": [{"from": "bot", "value": "x"}]},  # 7: unknown ShareGPT sender
        {"messages": "hello"},  # 8: not a list
        {"messages": [{"role": "user", "content": None}]},  # 9: null content
        {"messages": [], "conversations": []},  # 10: both formats
        {"conversations": [{"role": "user", "content": "hi"}]},  # 11: OpenAI turns under 'conversations'
        {"messages": ["hi"]},  # 12: turn is not an object
    ]
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load(path)
    err = info.value
    assert len(err.problems) == 11
    text = err.render()
    assert f"{path}:1:" not in text
    for line, expected in [
        (2, "found keys 'prompt', 'response'; expected 'messages'"),
        (3, "'messages[0]' has keys ['from', 'value']; expected 'role' and 'content' (it looks like a ShareGPT turn"),
        (4, "'messages[1].role' is 'tool'; expected one of system, user, assistant"),
        (5, "'messages[0].content' must be a string, got list"),
        (6, "'messages' is empty"),
        (7, "'conversations[0].from' is 'bot'; expected one of human"),
        (8, "'messages' must be a list of turns, got str"),
        (9, "'messages[0].content' must be a string, got null"),
        (10, "has both 'messages' and 'conversations'"),
        (11, "expected 'from' and 'value' (it looks like an OpenAI turn"),
        (12, "'messages[0]' must be an object with 'role' and 'content', got str"),
    ]:
        assert any(p.startswith(f"{path}:{line}: ") and expected in p for p in err.problems), (line, err.problems)


def test_invalid_json_is_reported_by_the_reader(tmp_path):
    path = write(tmp_path, [MATH, "{not json", MATH])
    with pytest.raises(DataError, match=r":2: not valid JSON"):
        load(path)


# --- extraction ---------------------------------------------------------------------------


def test_several_followups_in_one_conversation(tmp_path):
    row = oa(
        ("system", "You are terse."),
        ("user", "Name a cat."), ("assistant", "Whiskers."),
        ("user", "Less common."), ("assistant", "Juniper."),
        ("user", "A boy's name."), ("assistant", "Archibald."),
    )
    report = load(write(tmp_path, [row]))
    assert [e.id for e in report.examples] == ["log.jsonl:1#2", "log.jsonl:1#4"]
    first, second = report.examples
    assert first.prompt == row["messages"][:2]
    assert second.prompt == row["messages"][:4]  # system prompt kept, ends at the user message answered
    assert second.prompt[0]["role"] == "system" and second.prompt[-1] == {"role": "user", "content": "Less common."}
    assert [first.fields["followup"], second.fields["followup"]] == ["Less common.", "A boy's name."]
    assert second.fields["logged_response"] == "Juniper."
    assert report.skipped == {"no_followup": 1}


def test_conversation_ending_with_user_turn_counts_every_reply(tmp_path):
    row = oa(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e"))
    report = load(write(tmp_path, [row]))
    assert len(report.examples) == 2 and report.skipped == {}


def test_turns_that_do_not_answer_a_user_are_skipped(tmp_path):
    rows = [
        oa(("assistant", "Hi! How can I help?"), ("user", "What is 2+2?"), ("assistant", "5"), ("user", "No, 4.")),
        oa(("user", "a"), ("assistant", "b"), ("assistant", "c"), ("user", "d")),
    ]
    report = load(write(tmp_path, rows))
    assert [e.id for e in report.examples] == ["log.jsonl:1#2"]
    # the greeting and "c" answer no user message; "b" is followed by an assistant turn
    assert report.skipped == {"no_user_before": 2, "no_followup": 1}


def test_blank_turns_are_skipped(tmp_path):
    rows = [oa(("user", "q"), ("assistant", "  "), ("user", "hello?")), oa(("user", "q"), ("assistant", "a"), ("user", ""))]
    with pytest.raises(DataError, match="empty_turn: 2"):
        load(write(tmp_path, rows))


def test_nothing_left_is_an_error_listing_the_counts(tmp_path):
    path = write(tmp_path, [oa(("user", "What is 15% of 80?"), ("assistant", "12."))])
    with pytest.raises(DataError, match="no examples") as info:
        load(path)
    assert "no_followup: 1" in info.value.problems


def test_offline_mode_trains_on_the_logged_reply(tmp_path):
    ex = load(write(tmp_path, [MATH]), mode="offline").examples[0]
    assert ex.response == "54."
    assert ex.fields["logged_response"] == "54."


def test_online_mode_samples_and_keeps_the_logged_reply(tmp_path):
    ex = load(write(tmp_path, [MATH]), mode="online").examples[0]
    assert ex.response is None
    assert ex.fields["logged_response"] == "54."


def test_conversation_id_kept_but_example_id_is_located(tmp_path):
    row = {"id": "chat-42", **MATH}
    ex = load(write(tmp_path, [row], name="logs.jsonl")).examples[0]
    assert ex.id == "logs.jsonl:1#1"
    assert ex.fields["conversation_id"] == "chat-42"


# --- filters ------------------------------------------------------------------------------


def followup_rows() -> list[dict]:
    return [
        oa(("user", "q1"), ("assistant", "a1"), ("user", "thanks")),
        oa(("user", "q2"), ("assistant", "a2"), ("user", "No, I meant the other one.")),
        oa(("user", "q3"), ("assistant", "a3"), ("user", "That's wrong, the API changed.")),
        oa(("user", "q4"), ("assistant", "a4"), ("user", "Shorter please, in one line.")),
    ]


def test_min_followup_chars(tmp_path):
    report = load(write(tmp_path, followup_rows()), min_followup_chars=7)
    assert len(report.examples) == 3
    assert report.skipped == {"followup_too_short": 1}
    assert "thanks" not in [e.fields["followup"] for e in report.examples]


def test_min_followup_chars_ignores_surrounding_whitespace(tmp_path):
    rows = [oa(("user", "q"), ("assistant", "a"), ("user", "   ok   ")), *followup_rows()]
    assert load(write(tmp_path, rows), min_followup_chars=3).skipped == {"followup_too_short": 1}


def test_exclude_regex(tmp_path):
    report = load(write(tmp_path, followup_rows()), exclude=r"(?i)^thanks")
    assert len(report.examples) == 3
    assert report.skipped == {"excluded_by_regex": 1}


def test_include_regex(tmp_path):
    report = load(write(tmp_path, followup_rows()), include=r"(?i)\b(no|wrong)\b")
    assert [e.fields["followup"] for e in report.examples] == ["No, I meant the other one.", "That's wrong, the API changed."]
    assert report.skipped == {"not_included_by_regex": 2}


def test_filters_count_each_turn_once_in_order(tmp_path):
    # "thanks" is too short AND not included: counted only as too short (the first filter that applies)
    report = load(write(tmp_path, followup_rows()), min_followup_chars=7, exclude="API", include="(?i)no|short")
    assert [e.fields["followup"] for e in report.examples] == ["No, I meant the other one.", "Shorter please, in one line."]
    assert report.skipped == {"followup_too_short": 1, "excluded_by_regex": 1}


# --- history truncation -------------------------------------------------------------------


LONG = oa(
    ("system", "Be brief."),
    ("user", "u1"), ("assistant", "a1"),
    ("user", "u2"), ("assistant", "a2"),
    ("user", "u3"), ("assistant", "a3"),
    ("user", "u4"), ("assistant", "a4"),
    ("user", "follow-up"),
)


def contents(messages):
    return [m["content"] for m in messages]


def test_truncation_keeps_system_and_ends_at_the_prompt(tmp_path):
    report = load(write(tmp_path, [LONG]), max_history_messages=2)
    last = report.examples[-1]
    assert contents(last.prompt) == ["Be brief.", "u3", "a3", "u4"]
    assert last.fields["followup"] == "follow-up"
    # a1 and a2 answer prompts with 0 and 2 messages of history: not cut; a3, a4 are
    assert [len(e.prompt) for e in report.examples] == [2, 4, 4, 4]
    assert report.warnings == [
        "history cut to the last 2 message(s) before the prompt in 2 of 4 example(s) "
        "(signal.max_history_messages=2; system prompts kept)"
    ]


def test_truncation_starts_history_at_a_user_turn():
    prompt = LONG["messages"][:8]  # system, u1 a1 u2 a2 u3 a3, u4
    kept, cut = truncate_history(prompt, 3)  # the last 3 would start at a2: dropped too
    assert cut and contents(kept) == ["Be brief.", "u3", "a3", "u4"]
    kept, cut = truncate_history(prompt, 1)
    assert cut and contents(kept) == ["Be brief.", "u4"]


def test_truncation_keeps_every_system_message_in_place():
    prompt = oa(("system", "s1"), ("user", "u1"), ("assistant", "a1"), ("system", "s2"),
                ("user", "u2"), ("assistant", "a2"), ("user", "u3"))["messages"]
    kept, cut = truncate_history(prompt, 2)
    assert cut and contents(kept) == ["s1", "s2", "u2", "a2", "u3"]


def test_no_truncation_within_limit():
    prompt = LONG["messages"][:4]
    assert truncate_history(prompt, 2) == (prompt, False)
    assert truncate_history(prompt, None) == (prompt, False)


def test_no_warning_without_truncation(tmp_path):
    assert load(write(tmp_path, [LONG])).warnings == []


# --- teacher views ------------------------------------------------------------------------


def test_default_template_renders_prompt_and_followup(tmp_path):
    builder = InteractionsBuilder(InteractionsSignal(mode="online_logged_followup"))
    ex = builder.load(write(tmp_path, [oa(("system", "Be brief."), *[(m["role"], m["content"]) for m in MATH["messages"]])])).examples[0]
    views = builder.teacher_views(ex, ["54.", "It is 56."])
    assert len(views) == 2
    expected = DEFAULT_HINDSIGHT_TEMPLATE.format(prompt="What is 7*8?", followup="Wrong, 7*8 is 56.")
    for view in views:
        assert view.messages[:-1] == [{"role": "system", "content": "Be brief."}]
        assert view.messages[-1] == {"role": "user", "content": expected}
        assert view.feedback == "Wrong, 7*8 is 56."
    assert "54." not in views[0].messages[-1]["content"]  # the default does not show the attempt
    assert ex.prompt[-1]["content"] == "What is 7*8?"  # the student's prompt is untouched


def test_template_with_response_shows_the_scored_response(tmp_path):
    cfg = InteractionsSignal(mode="online_logged_followup", hindsight_template="Q: {prompt}\nYou said: {response}\nUser: {followup}")
    builder = InteractionsBuilder(cfg)
    ex = builder.load(write(tmp_path, [MATH])).examples[0]
    a, b = builder.teacher_views(ex, ["54.", "It is {56}."])
    assert a.messages[-1]["content"] == "Q: What is 7*8?\nYou said: 54.\nUser: Wrong, 7*8 is 56."
    assert b.messages[-1]["content"] == "Q: What is 7*8?\nYou said: It is {56}.\nUser: Wrong, 7*8 is 56."


def test_braces_in_conversation_text_are_not_template_fields(tmp_path):
    row = oa(("user", "Format {x} in f-strings?"), ("assistant", "Use {x!r}."), ("user", "No, I meant {{x}}."))
    builder = InteractionsBuilder(InteractionsSignal(mode="online_logged_followup"))
    ex = builder.load(write(tmp_path, [row])).examples[0]
    text = builder.teacher_views(ex, ["y"])[0].messages[-1]["content"]
    assert "Format {x} in f-strings?" in text and "No, I meant {{x}}." in text


def test_template_without_followup_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="followup"):
        InteractionsSignal(hindsight_template="{prompt} only")


# --- the shipped log ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "online", "online_logged_followup"])
def test_shipped_log_loads_cleanly(mode):
    report = load(SHIPPED, mode=mode)
    assert len(report.examples) > 20
    assert set(report.skipped) <= {"no_followup"}
    assert report.warnings == []
    assert all(e.prompt[-1]["role"] == "user" for e in report.examples)
    assert any(e.prompt[0]["role"] == "system" for e in report.examples)
    lines = SHIPPED.read_text().splitlines()
    assert any('"conversations"' in line for line in lines) and any('"messages"' in line for line in lines)
    assert all((e.response is not None) == (mode == "offline") for e in report.examples)
