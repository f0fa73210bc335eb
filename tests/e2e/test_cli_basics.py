"""Every command has --help with examples; every shipped recipe validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdcli.cli import app

REPO = Path(__file__).resolve().parents[2]
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def sd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdcli.cli", *args], capture_output=True, text=True, timeout=300)


def test_top_level_help_lists_commands():
    done = sd("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command_has_examples(command):
    done = sd(command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Examples" in done.stdout and f"sd {command}" in done.stdout


def test_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_opens_with_how_to_run(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("#")
    assert f"sd train recipes/{recipe.name}" in recipe.read_text().split("\n\n")[0]
    done = sd("validate", str(recipe))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "OK" in done.stdout


def test_unknown_argument_exits_2():
    done = sd("train", "not-a-recipe")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = sd("train", "--no-such-flag", "x.yaml")
    assert done.returncode == 2
