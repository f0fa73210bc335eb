"""Demonstrations: the teacher sees an example answer (SDFT).

Data: one JSON object per line, `{"prompt": str | messages, "demonstration": str}`; an optional
`"id"` names the example in messages. The teacher's final user turn is `teacher_template`
rendered with {prompt} (the student's final user text) and {demonstration}.
"""

from __future__ import annotations

from pathlib import Path

from sdcli.core.data import JsonlScan, LazyRecords, LineIndex, as_messages, example_id
from sdcli.core.errors import DataError
from sdcli.core.prompts import demonstration_turn
from sdcli.recipe.signal_sections import DemonstrationsSignal
from sdcli.signals.base import Example, LoadReport, TeacherView, context_view


def line_example(path: Path, line: int, record: dict) -> Example:
    """The example on one line of the data file; ValueError says what is wrong with the line."""
    prompt = as_messages(record.get("prompt"), "prompt")
    demo = record.get("demonstration")
    if not isinstance(demo, str) or not demo.strip():
        raise ValueError("'demonstration' must be a non-empty string")
    return Example(id=example_id(path, line, record), prompt=prompt, fields={"demonstration": demo})


class DemonstrationsBuilder:
    def __init__(self, cfg: DemonstrationsSignal):
        self.cfg = cfg

    def load(self, path: Path) -> LoadReport:
        path = Path(path)
        problems, index, scan = [], LineIndex(), JsonlScan(path)
        for line, offset, record in scan:
            try:
                line_example(path, line, record)
            except ValueError as e:
                problems.append(f"{path}:{line}: {e}")
                continue
            index.add(offset, line)
        if problems:
            raise DataError(
                f"{path}: {len(problems)} bad line(s) for signal 'demonstrations':",
                problems,
                hint='Each line needs {"prompt": "..." or [messages], "demonstration": "..."}.',
            )
        return LoadReport(LazyRecords(path, scan.stamp, index, lambda line, record, _: line_example(path, line, record)))

    def teacher_view(self, example: Example) -> TeacherView:
        return context_view(example.prompt, demonstration_turn(self.cfg.teacher_template, example.prompt,
                                                               example.fields["demonstration"]))

    def teacher_views(self, example: Example, responses: list[str]) -> list[TeacherView]:
        view = self.teacher_view(example)
        return [view for _ in responses]

    def demonstration_view(self, example: Example) -> tuple[str, TeacherView]:
        return example.fields["demonstration"], self.teacher_view(example)
