"""sd train and sd validate: recipes in, episodes (or a check of them) out."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.table import Table

from sdcli.cli import app
from sdcli.cli.output import console, log, out
from sdcli.core.errors import UserError
from sdcli.core.metric_names import DEMO_NLL_STUDENT, DEMO_NLL_TEACHER, DIVERGENCE, LOSS, TOKENS_PER_S


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
    "  sd train recipes/quickstart.yaml --resume               (continue an interrupted episode)\n\n"
    "  sd train recipes/quickstart.yaml --nproc 2              (2 data-parallel ranks on this machine)\n\n"
    "  torchrun --nproc_per_node=4 -m sdcli train recipes/quickstart.yaml   (the same, by torchrun)\n\n"
    "Only one sd command writes into a run_dir at a time (run_dir/.lock); another one is refused "
    "with the holder's pid, host and command.",
)
def train(
    args: List[str] = typer.Argument(..., metavar="RECIPE... [KEY=VALUE]...", help="Recipe files, then overrides"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted episode of the same name"),
    allow_mixed_base: bool = typer.Option(
        False, "--allow-mixed-base",
        help="Stack on earlier episodes even if they were trained on a base model with other weights "
        "(refused by default: their adapters would not fit this base)",
    ),
    nproc: int = typer.Option(
        1, "--nproc", min=1, max=1024,
        help="Data-parallel ranks on this machine (one per GPU, or CPU processes), started as torchrun would; "
        "for several machines run torchrun yourself (README: More than one GPU / machine)",
    ),
):
    """Train one learning episode per recipe, each on top of the episodes already in run_dir."""
    from sdcli.training import distributed

    if nproc > 1:
        if distributed.current().world > 1:
            raise UserError("--nproc inside a torchrun job: torchrun already started the ranks.",
                            hint="Drop --nproc, or run sd train --nproc N without torchrun.")
        flags = [*(["--quiet"] if quiet else []), *(["--resume"] if resume else []),
                 *(["--allow-mixed-base"] if allow_mixed_base else [])]
        raise typer.Exit(distributed.launch_local(nproc, ["train", *args, *flags]))
    ranks = distributed.current()
    if not ranks.is_main:
        console.quiet = True  # rank 0 speaks for the job
    with ranks.one_job():
        _train(args, quiet=quiet, resume=resume, allow_mixed_base=allow_mixed_base)


def _train(args: list[str], quiet: bool, resume: bool, allow_mixed_base: bool) -> None:
    from sdcli.recipe.loading import load_recipe
    from sdcli.validate import check_model_folder

    recipe_paths, overrides = split_recipes_and_overrides(args)
    recipes = [load_recipe(p, overrides) for p in recipe_paths]  # validate all before training any
    for recipe in recipes:  # the base model from its headers: a bad folder fails now, not after a load
        check_model_folder(recipe.model, recipe.lora)

    for path, recipe in zip(recipe_paths, recipes):
        console.print(f"[bold]episode[/bold] '{recipe.name}' from {path} -> {recipe.run_dir}")
        result = _run_with_progress(recipe, quiet=quiet, resume=resume, recipe_file=path, allow_mixed_base=allow_mixed_base)
        final = result.final
        console.print(
            f"[green]done[/green] {result.path}  steps={result.steps}  loss={final.get(LOSS, float('nan')):.4f}  "
            f"divergence={final.get(DIVERGENCE, float('nan')):.4f}"
        )


def step_line(m: dict, is_: str, sep: str) -> str:
    """One step's metrics for the console: the loss, how far the student is from the demonstrations
    on a step that learns them (their NLL per token under the student; the teacher's is its floor),
    and the speed; sampling speed only on a step that sampled."""
    parts = [f"loss{is_}{m[LOSS]:.4f}", f"divergence{is_}{m[DIVERGENCE]:.4f}"]
    if m.get(DEMO_NLL_STUDENT) is not None:
        parts.append(f"demo_nll{is_}{m[DEMO_NLL_STUDENT]:.3f}/{m[DEMO_NLL_TEACHER]:.3f}")
    parts.append(f"len{is_}{m['response/mean_tokens']:.1f}")
    if m[TOKENS_PER_S] > 0:
        parts.append(f"tok/s{is_}{m[TOKENS_PER_S]:.1f}")
    parts.append(f"step_s{is_}{m['time/step_s']:.2f}")
    return sep.join(parts)


def _run_with_progress(recipe, quiet: bool, resume: bool, recipe_file: Path | None = None, allow_mixed_base: bool = False):
    from sdcli.training.train import train_episode

    if quiet or not console.is_terminal:
        def progress(step, m):
            console.print(f"step {step}/{m['steps_total']} {step_line(m, '=', ' ')}", markup=False, highlight=False)
        return train_episode(recipe, resume=resume, log=log, progress=progress, recipe_file=recipe_file,
                             allow_mixed_base=allow_mixed_base)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console,
    ) as bar:
        task = bar.add_task(recipe.name, total=None, stats="loading...")

        def progress(step, m):
            bar.update(
                task, completed=step, total=m["steps_total"],
                stats=step_line(m, " ", "  "),
            )

        return train_episode(
            recipe, resume=resume, log=lambda s: bar.console.print(s, markup=False, highlight=False), progress=progress,
            recipe_file=recipe_file, allow_mixed_base=allow_mixed_base,
        )


@app.command(
    epilog="Examples:\n\n"
    "  sd validate recipes/quickstart.yaml\n\n"
    "  sd validate my.yaml data.path=other.jsonl",
)
def validate(
    args: List[str] = typer.Argument(..., metavar="RECIPE... [KEY=VALUE]...", help="Recipe files, then overrides"),
):
    """Check recipes, their data files and model paths without training."""
    from sdcli.recipe.loading import load_recipe
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
