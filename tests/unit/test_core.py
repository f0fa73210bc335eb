"""The facts written once in sdcli/core (and the lists that must stay one): each of their users
goes through them, so these tests pin what every user gets."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from sdcli.core.atomic import atomic_file, atomic_folder, swap_folder, write_atomic
from sdcli.core.errors import SHOWN_PROBLEMS, DataError
from sdcli.core.numbers import fmt
from sdcli.core.prompts import demonstration_turn, joined


def test_write_atomic_creates_the_file_as_open_would_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "sub" / "a.json", '{"x": 1}')
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "a.json"
    assert path.read_text() == '{"x": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, as open(path, "w") makes it
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        assert not (tmp_path / "model").exists()
    assert (tmp_path / "model" / "config.json").is_file()
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "other") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_swap_folder_replaces_a_folder_and_removes_the_old_one(tmp_path):
    target, new, aside = tmp_path / "out", tmp_path / ".new", tmp_path / ".aside"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    swap_folder(new, target, aside)
    assert [p.name for p in target.iterdir()] == ["new.txt"] and not aside.exists() and not new.exists()


def test_a_message_shows_the_first_problems_then_how_many_more():
    error = DataError("data.jsonl: 53 bad line(s):", [f"line {i}" for i in range(SHOWN_PROBLEMS + 3)])
    lines = error.render().splitlines()
    assert lines[1] == "  - line 0" and lines[SHOWN_PROBLEMS] == f"  - line {SHOWN_PROBLEMS - 1}"
    assert lines[SHOWN_PROBLEMS + 1] == "  - ... and 3 more" and len(lines) == SHOWN_PROBLEMS + 2
    assert len(error.problems) == SHOWN_PROBLEMS + 3  # every problem is kept; only the message is cut
    assert "more" not in DataError("x", ["a"] * SHOWN_PROBLEMS).render()


def test_numbers_are_shown_by_one_rule():
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 2) == "0.12" and fmt(2, 4) == "2.0000"
    assert fmt(None) == fmt(math.nan) == "-"
    assert fmt(0.25, sign=True) == "+0.250" and fmt(-0.25, sign=True) == "-0.250"
    assert fmt(0.000123456, 4, significant=True) == "0.0001235" and fmt(3, 4, significant=True) == "3"


def test_evaluation_and_the_demonstrations_signal_render_the_teacher_turn_alike(tmp_path):
    from sdcli.evaluation.eval_sets import EvalExample
    from sdcli.evaluation.scoring import teacher_messages
    from sdcli.recipe.signal_sections import DemonstrationsSignal
    from sdcli.signals.base import Example
    from sdcli.signals.demonstrations import DemonstrationsBuilder

    template = "Q: {prompt!r}\nA model answer: {demonstration}\nNow answer."  # a conversion, which str.format and fill both do
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of {Zorblax}?"}]
    demo = "It is {Quenta}."  # braces in the data are text, not fields
    view = DemonstrationsBuilder(DemonstrationsSignal(teacher_template=template)).teacher_view(
        Example(id="a", prompt=prompt, fields={"demonstration": demo}))
    assert teacher_messages(EvalExample("a", prompt, {}, "contains", demo), template) == view.messages
    assert view.messages[-1]["content"] == joined(demonstration_turn(template, prompt, demo))
    assert view.messages[-1]["content"] == "Q: 'Capital of {Zorblax}?'\nA model answer: It is {Quenta}.\nNow answer."


def test_every_signal_kind_has_its_builder_and_its_schema():
    from pydantic import TypeAdapter

    from sdcli.recipe.signal_sections import SIGNAL_CLASSES, SIGNAL_KINDS, SignalConfig
    from sdcli.signals import build_signal

    assert SIGNAL_KINDS == ("demonstrations", "rewards", "feedback", "interactions")
    for kind, cls in SIGNAL_CLASSES.items():
        builder = build_signal(cls())
        assert type(builder).__name__ == f"{kind.capitalize()}Builder"
        assert type(TypeAdapter(SignalConfig).validate_python({"kind": kind})) is cls  # the schema's union


def test_example_ids_follow_one_rule_in_every_signal(tmp_path):
    from sdcli.core.data import example_id

    path = Path("data.jsonl")
    assert example_id(path, 3, {"id": "q1"}) == "q1" and example_id(path, 3, {"id": 7}) == "7"
    assert example_id(path, 3, {"id": True}) == example_id(path, 3, {"id": ""}) == example_id(path, 3, {}) == "data.jsonl:3"
    from sdcli.signals.demonstrations import line_example

    assert line_example(path, 3, {"id": True, "prompt": "Q?", "demonstration": "A."}).id == "data.jsonl:3"
