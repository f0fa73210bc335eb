"""Where sd's commands print: `console` (stderr) for messages and progress, `out` (stdout) for results."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)
out = Console(width=None if sys.stdout.isatty() else 160)


def log(message: str) -> None:
    """A message to stderr, as text (paths and overrides hold brackets that are not markup)."""
    console.print(message, markup=False, highlight=False)


def out_print(line: str) -> None:
    out.print(line, markup=False, highlight=False)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out.print(table)
