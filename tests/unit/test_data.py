"""Data files: every bad line reported with its number; prompts as strings or messages."""

import json

import pytest

from sdcli.core.data import as_messages
from sdcli.core.errors import DataError
from sdcli.recipe.signal_sections import DemonstrationsSignal
from sdcli.signals.demonstrations import DemonstrationsBuilder


def test_demonstrations_load_and_teacher_view(facts_jsonl):
    builder = DemonstrationsBuilder(DemonstrationsSignal())
    report = builder.load(facts_jsonl)
    assert len(report.examples) == 3
    ex = report.examples[2]
    assert ex.prompt[0] == {"role": "system", "content": "Be brief."}
    views = builder.teacher_views(ex, ["a", "b"])
    assert len(views) == 2
    teacher = views[0].messages
    assert teacher[0]["role"] == "system"  # the system prompt is kept
    assert "This is an example for a response to the question:\nThe answer is 4." in teacher[-1]["content"]
    assert teacher[-1]["content"].startswith("What is 2+2?")
    assert ex.prompt[-1]["content"] == "What is 2+2?"  # the student's prompt is untouched


def test_every_bad_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "demonstration": "fine"}) + "\n"
        + "{not json\n"
        + "\n"
        + json.dumps([1, 2]) + "\n"
    )
    with pytest.raises(DataError) as e:
        DemonstrationsBuilder(DemonstrationsSignal()).load(path)
    text = e.value.render()
    assert f"{path}:2: not valid JSON" in text
    assert f"{path}:4: expected a JSON object" in text


def test_missing_fields_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "ok", "demonstration": "fine"}, {"prompt": "no demo"}, {"demonstration": "no prompt"},
            {"prompt": [{"role": "assistant", "content": "x"}], "demonstration": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        DemonstrationsBuilder(DemonstrationsSignal()).load(path)
    text = e.value.render()
    assert "3 bad line(s)" in text
    assert f"{path}:2: 'demonstration'" in text and f"{path}:3: 'prompt'" in text and f"{path}:4:" in text


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        DemonstrationsBuilder(DemonstrationsSignal()).load(path)


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="role"):
        as_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="end with a user"):
        as_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
