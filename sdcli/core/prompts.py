"""Teacher prompts as text in pieces, and the one rendering of the demonstrations template.

The demonstrations signal (sdcli.signals.demonstrations) and evaluation's teacher score
(sdcli.evaluation.scoring) both render a line's demonstration into the teacher's final user
turn; `demonstration_turn` is that rendering, here beneath both so that the two cannot drift apart.

A text in pieces is a tuple of (text, is_context): "".join(text) is the text, and the pieces
marked as context (a demonstration, a solution, feedback, a follow-up) are the ones that may be
shortened when the teacher's prompt is too long (sdcli.models.sequences.TeacherPromptEncoder).
"""

from __future__ import annotations

import string

from sdcli.core.data import Messages, last_user_text

Pieces = tuple[tuple[str, bool], ...]


def context(text: str) -> Pieces:
    """`text` as one piece of context, to go into `fill`."""
    return ((text, True),)


def fill(template: str, **fields: "str | Pieces") -> Pieces:
    """`template.format(**fields)` in pieces. A field given as Pieces (`context(text)`, or another
    `fill`) keeps its pieces; a plain string, and the template's own words, are not context."""
    out: list[tuple[str, bool]] = []
    formatter = string.Formatter()
    for literal, name, spec, conversion in formatter.parse(template):
        out.append((literal, False))
        if name is None:
            continue
        value = fields[name]
        if isinstance(value, tuple):
            out += value
        else:
            out.append((formatter.format_field(formatter.convert_field(value, conversion), spec or ""), False))
    return tuple((text, is_context) for text, is_context in out if text)


def joined(pieces: Pieces) -> str:
    return "".join(text for text, _ in pieces)


def demonstration_turn(template: str, prompt: Messages, demonstration: str) -> Pieces:
    """The teacher's final user turn for a demonstration: `template` (signal.teacher_template)
    with {prompt} the student's final user text and {demonstration} as context."""
    return fill(template, prompt=last_user_text(prompt), demonstration=context(demonstration))
