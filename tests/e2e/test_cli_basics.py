"""Every command has --help with examples; every shipped and benchmark recipe validates (in-process:
the app `sd` runs, through Typer's CliRunner; one test keeps the real process for its exit codes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd_runner import sd
from sdcli.cli import app

REPO = Path(__file__).resolve().parents[2]
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def sd_process(*args: str) -> subprocess.CompletedProcess:
    """The real `sd` process, for what only it shows: `main()`'s exit codes, from `python -m sdcli.cli`."""
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
    done = sd_process("train", "not-a-recipe")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = sd_process("train", "--no-such-flag", "x.yaml")
    assert done.returncode == 2


BENCHMARK_RECIPES = sorted((REPO / "benchmarks").glob("*/task*.yaml"))


@pytest.mark.parametrize("recipe", BENCHMARK_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmark_recipes_load_and_measure_the_defaults(recipe):
    """The fact benchmarks report what the shipped defaults do: their recipes may set the budget
    and the seed, nothing else about training."""
    import yaml

    from sdcli.recipe.loading import load_recipe

    loaded = load_recipe(recipe)
    assert loaded.eval is not None and loaded.eval.path.is_file()
    done = sd("validate", str(recipe))  # what `sd validate` checks: data, model folder, eval sets
    assert done.returncode == 0, done.stderr + done.stdout
    assert "OK" in done.stdout
    raw = yaml.safe_load(recipe.read_text())
    assert not {"rollout", "loss", "teacher", "lora", "anchor"} & set(raw), recipe
    assert set(raw.get("train", {})) <= {"epochs", "max_steps", "seed"}, recipe


def test_there_are_two_fact_benchmarks():
    assert {p.parent.name for p in BENCHMARK_RECIPES} == {"continual_facts", "world_facts"}
