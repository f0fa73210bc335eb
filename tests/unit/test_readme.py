"""README tells the truth: its recipe reference is the schema's, its commands exist."""

from pathlib import Path

from sdcli.cli import app
from sdcli.recipe.reference import recipe_reference_markdown

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def between(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0].split("-->", 1)[1].strip()


def test_recipe_reference_matches_the_schema():
    assert between("<!-- recipe-reference:start", "<!-- recipe-reference:end -->") == recipe_reference_markdown(), (
        "README's recipe reference is stale: regenerate it from sdcli.recipe.reference.recipe_reference_markdown()"
    )


def test_every_command_is_documented():
    for command in app.registered_commands:
        assert f"sd {command.name or command.callback.__name__}" in README
