"""The `sd` command line: parse, call, report. No training logic lives here.

Exit codes: 0 success, 2 bad input (recipe, data, arguments, paths), 1 anything else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sdcli import __version__
from sdcli.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="sd: continual fine-tuning of language models by on-policy self-distillation.\n\n"
    "Start with:  sd train recipes/quickstart.yaml",
)
console = Console(stderr=True, soft_wrap=True)
out = Console()


def split_recipes_and_overrides(args: list[str]) -> tuple[list[Path], list[str]]:
    recipes, overrides = [], []
    for a in args:
        if a.endswith((".yaml", ".yml")) and "=" not in a:
            recipes.append(Path(a))
        elif "=" in a:
            overrides.append(a)
        else:
            raise UserError(
                f"Argument {a!r} is neither a recipe (.yaml) nor an override (key=value).",
                hint="Example: sd train recipes/quickstart.yaml train.max_steps=10",
            )
    if not recipes:
        raise UserError("No recipe given.", hint="Example: sd train recipes/quickstart.yaml")
    return recipes, overrides


@app.command(
    epilog="Examples:\n\n"
    "  sd train recipes/quickstart.yaml\n\n"
    "  sd train recipes/quickstart.yaml train.max_steps=10 loss.divergence=jsd loss.alpha=0.5\n\n"
    "  sd train facts.yaml more_facts.yaml run_dir=runs/mine   (two chained episodes)\n\n"
    "  sd train recipes/quickstart.yaml --resume               (continue an interrupted episode)",
)
def train(
    args: List[str] = typer.Argument(..., metavar="RECIPE... [KEY=VALUE]...", help="Recipe files, then overrides"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted episode of the same name"),
):
    """Train one learning episode per recipe, each on top of the episodes already in run_dir."""
    from sdcli.config import load_recipe

    recipe_paths, overrides = split_recipes_and_overrides(args)
    recipes = [load_recipe(p, overrides) for p in recipe_paths]  # validate all before training any
    from sdcli.train import train_episode

    for path, recipe in zip(recipe_paths, recipes):
        console.print(f"[bold]episode[/bold] '{recipe.name}' from {path} -> {recipe.run_dir}")
        result = _run_with_progress(recipe, quiet=quiet, resume=resume)
        final = result.final
        console.print(
            f"[green]done[/green] {result.path}  steps={result.steps}  loss={final.get('loss', float('nan')):.4f}  "
            f"kl={final.get('kl', float('nan')):.4f}"
        )


def _run_with_progress(recipe, quiet: bool, resume: bool):
    from sdcli.train import train_episode

    log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
    if quiet or not console.is_terminal:
        def progress(step, m):
            console.print(
                f"step {step}/{recipe.train.max_steps} loss={m['loss']:.4f} kl={m['kl']:.4f} "
                f"len={m['response/mean_tokens']:.1f} tok/s={m['tokens_per_s']:.1f} step_s={m['time/step_s']:.2f}",
                markup=False, highlight=False,
            )
        return train_episode(recipe, resume=resume, log=log, progress=progress)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console,
    ) as bar:
        task = bar.add_task(recipe.name, total=recipe.train.max_steps, stats="loading...")

        def progress(step, m):
            bar.update(
                task, completed=step,
                stats=f"loss {m['loss']:.4f}  kl {m['kl']:.4f}  {m['tokens_per_s']:.0f} tok/s  {m['time/step_s']:.1f} s/step",
            )

        return train_episode(recipe, resume=resume, log=lambda s: bar.console.print(s, markup=False, highlight=False), progress=progress)


@app.command(
    epilog="Examples:\n\n"
    "  sd validate recipes/quickstart.yaml\n\n"
    "  sd validate my.yaml data.path=other.jsonl",
)
def validate(
    args: List[str] = typer.Argument(..., metavar="RECIPE... [KEY=VALUE]...", help="Recipe files, then overrides"),
):
    """Check recipes, their data files and model paths without training."""
    from sdcli.config import load_recipe
    from sdcli.validate import check_recipe

    recipe_paths, overrides = split_recipes_and_overrides(args)
    problems: list[str] = []
    for path in recipe_paths:
        try:
            recipe = load_recipe(path, overrides)
            summary = check_recipe(recipe)
        except UserError as e:
            problems.append(e.render())
            continue
        table = Table(title=f"{path}: OK", show_header=False)
        for key, value in summary.items():
            table.add_row(key, str(value))
        out.print(table)
    if problems:
        raise UserError("\n".join(problems))


def _click_module():
    """Typer vendors its own copy of click in recent versions; catch that one's exceptions."""
    try:
        from typer import _click as click  # type: ignore[attr-defined]
    except ImportError:
        import click
    return click


def main() -> None:
    click = _click_module()
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(2)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except UserError as e:
        console.print(f"[red]error:[/red] {e.render()}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # a bug or an environment failure: short message, traceback on request
        if os.environ.get("SD_DEBUG"):
            raise
        console.print(f"[red]internal error:[/red] {type(e).__name__}: {e}", highlight=False)
        console.print("Run again with SD_DEBUG=1 for the full traceback, and please report it.")
        sys.exit(1)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit")):
    if version:
        out.print(f"sd {__version__}")
        raise typer.Exit(0)


if __name__ == "__main__":
    main()
