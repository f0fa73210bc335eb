"""Errors meant for people.

`UserError` is bad input (recipe, data, arguments, paths): the CLI prints its message and
exits with code 2, never a traceback. Anything else is a bug or an environment failure and
exits with code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. `problems` holds one line per problem so that all of them are shown at once."""

    def __init__(self, headline: str, problems: list[str] | None = None, hint: str | None = None):
        self.headline = headline
        self.problems = list(problems or [])
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.headline]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


class Interrupted(Exception):
    """Ctrl-C during training, after the state of the last finished step was saved (exit code 130)."""
