"""The `sd` command line: parse, call, report. No training logic lives here.

Exit codes: 0 success; 2 bad input (recipe, data, model folder, arguments, paths, a place sd cannot
write to, a full disk), always with a message naming the file, line or key and no traceback; 130
interrupted; 1 anything else (a bug: the message asks for SD_DEBUG=1 and a report). The mapping
lives in the app itself (`_Commands`), so `sd` and an in-process `CliRunner` agree.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape  # messages hold paths, overrides and hints like 'sd[plot]': text, not markup
from rich.table import Table
from typer.core import TyperGroup

from sdcli import __version__
from sdcli.core.errors import DiskFullError, Interrupted, JobStopped, UserError, is_disk_full
from sdcli.core.metric_names import DIVERGENCE, LOSS, TOKENS_PER_S, current_names

# What sd sets in its own environment when a command runs (not at import: importing sdcli.cli, as
# the tests do, changes nothing). A variable the user set wins. sd never downloads: models are
# folders, or the built-in one.
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _click_module():
    """Typer vendors its own copy of click in recent versions; catch that one's exceptions."""
    try:
        from typer import _click as click  # type: ignore[attr-defined]
    except ImportError:
        import click
    return click


class _Commands(TyperGroup):
    """Every command runs inside `invoke`: exceptions become a message and an exit code here."""

    def invoke(self, ctx):
        click = _click_module()
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, typer.Exit, typer.Abort):
            raise  # usage errors (exit 2), --help, --version: typer reports them
        except JobStopped as e:  # a job of several ranks stopped: rank 0 says why, the others say nothing
            if e.render():
                print(e.render(), file=sys.stderr, flush=True)
            raise typer.Exit(e.code) from None
        except UserError as e:
            console.print(f"[red]error:[/red] {escape(e.render())}", highlight=False)
            raise typer.Exit(2) from None
        except Interrupted as e:
            console.print(str(e), markup=False, highlight=False)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        except SystemExit as e:  # code sd imported (a reward or environment module) called sys.exit()
            if os.environ.get("SD_DEBUG"):
                raise
            console.print(f"[red]internal error:[/red] {escape(f'code sd ran called sys.exit({e.code!r}).')}", highlight=False)
            console.print("Run again with SD_DEBUG=1 for the full traceback.")
            raise typer.Exit(1) from None
        except Exception as e:  # a bug or an environment failure: short message, traceback on request
            if os.environ.get("SD_DEBUG"):
                raise
            if is_disk_full(e):  # written by a library that does not name the file
                problem = DiskFullError(None, f" ({type(e).__name__}: {e})")
                console.print(f"[red]error:[/red] {escape(problem.render())}", highlight=False)
                raise typer.Exit(2) from None
            console.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
            console.print("Run again with SD_DEBUG=1 for the full traceback, and please report it.")
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="sd: continual fine-tuning of language models by on-policy self-distillation.\n\n"
    "Start with:  sd train recipes/quickstart.yaml",
)
console = Console(stderr=True, soft_wrap=True)
out = Console(width=None if sys.stdout.isatty() else 160)


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


def _run_with_progress(recipe, quiet: bool, resume: bool, recipe_file: Path | None = None, allow_mixed_base: bool = False):
    from sdcli.training.train import train_episode

    log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
    if quiet or not console.is_terminal:
        def progress(step, m):
            console.print(
                f"step {step}/{m['steps_total']} loss={m[LOSS]:.4f} divergence={m[DIVERGENCE]:.4f} "
                f"len={m['response/mean_tokens']:.1f} tok/s={m[TOKENS_PER_S]:.1f} step_s={m['time/step_s']:.2f}",
                markup=False, highlight=False,
            )
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
                stats=f"loss {m[LOSS]:.4f}  divergence {m[DIVERGENCE]:.4f}  {m[TOKENS_PER_S]:.0f} tok/s  "
                      f"{m['time/step_s']:.1f} s/step",
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


@app.command(
    epilog="Examples:\n\n"
    "  sd merge runs/quickstart --out merged/facts\n\n"
    "  sd merge runs/quickstart --out merged/first-two --upto 2\n\n"
    "  sd merge runs/quickstart --out merged/facts-adapter --into adapter --force",
)
def merge(
    run_dir: Path = typer.Argument(..., help="A run folder with episodes/"),
    out: Path = typer.Option(..., "--out", help="Where to write the result (must not exist unless --force)"),
    upto: Optional[int] = typer.Option(None, "--upto", help="Fold episodes 1..N only (default: all)"),
    into: str = typer.Option("model", "--into", help="model: a plain HF model folder; adapter: one PEFT adapter"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max logit difference allowed in the check"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out (only after the check passes)"),
):
    """Fold a history of episode adapters into one model or one adapter, checked numerically."""
    import contextlib
    import math

    from sdcli.models.episodes import EPISODES
    from sdcli.models.merge import DEFAULT_TOLERANCE, check_into, merge_history
    from sdcli.models.model import quiet_transformers
    from sdcli.models.runlock import run_lock
    from sdcli.models.source import select_episodes

    quiet_transformers()
    check_into(into, "--into")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance {tolerance}: expected a number >= 0 (the largest logit difference "
                        f"the check allows; default {DEFAULT_TOLERANCE:g}).")
    episodes = select_episodes(run_dir, upto)
    if not episodes:
        raise UserError("--upto 0 selects no episode; nothing to merge.")
    base = episodes[-1].meta["base_model"]
    into_run = _is_within(out, run_dir)
    if into_run and _is_within(out, run_dir / EPISODES):
        raise UserError(f"--out {out} is inside {run_dir / EPISODES}, where it would be taken for an episode.",
                        hint=f"Choose a folder outside it, e.g. --out {run_dir / 'merged'}.")
    # it writes into the run, so it holds the run like every writer (two merges with --force into one
    # --out would otherwise swap each other's folders)
    with run_lock(run_dir, f"sd merge --out {out}") if into_run else contextlib.nullcontext():
        report = merge_history(
            base["path"], [e.path for e in episodes], out, into=into, quantization=base.get("quantization", "none"),
            tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, force=force,
            log=lambda message: console.print(message, markup=False, highlight=False),
        )
    for line in report.lines():
        out_print(line)
    console.print(f"[green]merged[/green] {len(episodes)} episode(s) into {out}")


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _eval_cell(meta: dict) -> str:
    """The task score after the episode, from episode.json, if the recipe had an eval: section."""
    from sdcli.core.numbers import fmt

    sets = (meta.get("eval") or {}).get("sets") or []
    scores = [s.get("score") for s in sets if isinstance(s, dict) and s.get("role") == "task"]
    return fmt(scores[0] if scores and isinstance(scores[0], (int, float)) else None, 2)


def out_print(line: str) -> None:
    out.print(line, markup=False, highlight=False)


@app.command(
    epilog="Examples:\n\n  sd episodes runs/quickstart\n\n  sd episodes runs/quickstart --json",
)
def episodes(
    run_dir: Path = typer.Argument(..., help="A run folder with episodes/"),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON"),
):
    """Show the lineage of a run: one row per episode, in stacking order."""
    import json

    from sdcli.models.episodes import list_episodes

    if not (run_dir / "episodes").is_dir():
        raise UserError(f"{run_dir} is not a run folder (no episodes/ inside).")
    history = list_episodes(run_dir)
    if as_json:
        out.print_json(json.dumps([e.meta for e in history]))
        return
    table = Table(title=f"{run_dir}: {len(history)} episode(s)")
    for column in ("#", "name", "recipe", "signal", "method", "teacher", "steps", "data sha256", "final loss", "final divergence",
                   "eval", "adapter", "created"):
        table.add_column(column, overflow="fold")
    for e in history:
        m, final = e.meta, current_names(e.meta.get("final", {}))  # episodes written before the names changed
        size = (e.path / "adapter_model.safetensors").stat().st_size
        table.add_row(
            f"{e.number:03d}", e.name, Path(m["recipe_file"]).name if m.get("recipe_file") else "-",
            m.get("signal", "?"), m.get("method", "?"),
            m.get("teacher", "?"), str(m.get("steps")), m.get("data", {}).get("sha256", "")[:12],
            f"{final.get(LOSS, float('nan')):.4f}", f"{final.get(DIVERGENCE, float('nan')):.4f}", _eval_cell(m),
            f"{size / 2**20:.1f} MB", str(m.get("finished", ""))[:19],
        )
    out.print(table)


@app.command(
    epilog="Examples:\n\n"
    "  sd generate runs/quickstart --prompt \"What is the capital of Zorblax?\"\n\n"
    "  sd generate runs/quickstart --upto 1 --prompt \"...\"      (after episode 1 only)\n\n"
    "  sd generate runs/quickstart --no-adapters --prompt \"...\" (the base model)\n\n"
    "  sd generate merged/facts --chat",
)
def generate(
    source: Path = typer.Argument(..., help="A run folder, or a model folder (e.g. from sd merge)"),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="A user message; repeat for several"),
    upto: Optional[int] = typer.Option(None, "--upto", help="Use episodes 1..N only"),
    no_adapters: bool = typer.Option(False, "--no-adapters", help="The base model alone"),
    chat: bool = typer.Option(False, "--chat", help="Interactive conversation (empty line or Ctrl-D ends it)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, max=8192),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=5.0, help="0 = greedy"),
    seed: int = typer.Option(0, "--seed"),
):
    """Generate answers from a run (any prefix of its episodes) or a merged model."""
    import torch

    from sdcli.models.rollout import SamplingSettings, sample_responses
    from sdcli.models.sequences import PromptEncoder, eos_ids
    from sdcli.models.source import load_source

    if not prompt and not chat:
        raise UserError("Give at least one --prompt, or --chat.", hint='Example: sd generate runs/quickstart --prompt "Hi"')
    torch.manual_seed(seed)
    loaded = load_source(source, upto=upto, no_adapters=no_adapters)
    console.print(loaded.description, markup=False, highlight=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    encoder = PromptEncoder(tokenizer, 4096)
    stop = eos_ids(tokenizer, model)
    settings = SamplingSettings(max_new_tokens, temperature, 1.0, 0, merge=False)

    def answer(messages):
        ids = sample_responses(model, tokenizer, [encoder.encode(messages)], settings, stop)[0]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    for p in prompt:
        out.print(f"[bold]> {p}[/bold]", highlight=False)
        out.print(answer([{"role": "user", "content": p}]), markup=False, highlight=False)
    if chat:
        history: list[dict] = []
        while True:
            try:
                text = input("you> ")
            except EOFError:
                break
            if not text.strip():
                break
            history.append({"role": "user", "content": text})
            reply = answer(history)
            history.append({"role": "assistant", "content": reply})
            out.print(f"model> {reply}", markup=False, highlight=False)


@app.command(
    name="inspect",
    epilog="Examples:\n\n"
    "  sd inspect runs/quickstart --data recipes/data/facts.jsonl --index 0\n\n"
    "  sd inspect runs/quickstart --data recipes/data/facts.jsonl --index 2 --greedy --html teacher.html\n\n"
    "  sd inspect runs/arithmetic --upto 0 --data recipes/data/arithmetic.jsonl --index 3 --samples 8\n\n"
    "Green tokens are those the teacher wants more of, red those it wants less of "
    "(advantage = log p_teacher - log p_student); the summaries are those the training loop logs.",
)
def inspect_command(
    run_dir: Path = typer.Argument(..., help="A run folder with episodes/"),
    data: Path = typer.Option(..., "--data", "-d", help="A data file in the format of the run's recipe signal"),
    index: int = typer.Option(..., "--index", "-i", help="Which example of --data, counting from 0"),
    upto: Optional[int] = typer.Option(None, "--upto", help="Use episodes 1..N only (their recipe's signal: episode N's)"),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy responses instead of the recipe's sampling"),
    samples: Optional[int] = typer.Option(
        None, "--samples", min=1, help="Responses to the prompt (default: the recipe's rollout.num_samples; siblings)"
    ),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Default: the recipe's"),
    seed: int = typer.Option(0, "--seed"),
    html_file: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page"),
):
    """Show what the teacher wants: every token of a response coloured by the teacher's advantage."""
    from sdcli.core.atomic import write_atomic
    from sdcli.core.outputs import check_output_file
    from sdcli.inspection import inspect_example, print_inspection, render_html
    from sdcli.models.model import quiet_transformers

    quiet_transformers()
    if html_file is not None:
        check_output_file(html_file, "--html")
    log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
    result = inspect_example(run_dir, data, index, upto=upto, greedy=greedy, samples=samples,
                             max_new_tokens=max_new_tokens, seed=seed, log=log)
    print_inspection(result, out)
    if html_file is not None:
        write_atomic(html_file, render_html(result))
        console.print(f"wrote {html_file}", markup=False, highlight=False)


@app.command(
    name="eval",
    epilog="Examples:\n\n"
    "  sd eval runs/quickstart --data recipes/data/facts_eval.jsonl\n\n"
    "  sd eval runs/quickstart --no-adapters --data recipes/data/facts_eval.jsonl   (the base model)\n\n"
    "  sd eval runs/chain --matrix --data t1_eval.jsonl --data t2_eval.jsonl --out matrix.json\n\n"
    "  sd eval runs/chain --matrix --drift general_text.jsonl   (sets from the episodes' recipes)\n\n"
    "  sd eval merged/facts --data facts_eval.jsonl --reward exact_match --no-teacher",
)
def eval_command(
    source: Path = typer.Argument(..., help="A run folder, or a model folder (e.g. from sd merge)"),
    data: List[Path] = typer.Option(
        [], "--data", "-d",
        help="Eval set (JSONL: prompt, answer, optional demonstration and reward); repeat for several. "
        "Default for a run folder: the sets named in its episodes' recipes (eval.path, eval.retain)",
    ),
    matrix: bool = typer.Option(
        False, "--matrix", help="Run folder only: score the base and every prefix of episodes on every set; set j is episode j's task"
    ),
    upto: Optional[int] = typer.Option(None, "--upto", help="Use episodes 1..N only"),
    no_adapters: bool = typer.Option(False, "--no-adapters", help="The base model alone"),
    reward: str = typer.Option(
        "contains", "--reward", help="Scorer for lines without their own 'reward': exact_match | numeric | regex | contains | module:function"
    ),
    drift: Optional[Path] = typer.Option(None, "--drift", help='JSONL of {"text": ...}: mean KL from the base model and perplexity'),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also score with each line's demonstration in context"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generate call"),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the results, every answer included, as JSON"),
):
    """Score greedy answers on held-out sets, with the teacher's in-context score beside them."""
    import json

    from sdcli.core.numbers import fmt
    from sdcli.core.outputs import check_output_file
    from sdcli.evaluation.continual_matrix import matrix_table, metrics_lines
    from sdcli.evaluation.evaluate import evaluate_matrix, evaluate_source, load_eval_set, load_texts, stored_eval_sets
    from sdcli.models.model import quiet_transformers
    from sdcli.models.source import is_run_dir, select_episodes

    quiet_transformers()
    if out_json is not None:  # before the evaluation, whose results would otherwise be lost
        check_output_file(out_json, "--out")
    run = is_run_dir(source)
    if matrix and not run:
        raise UserError(f"--matrix needs a run folder (with episodes/); {source} is not one.")
    if matrix and (upto is not None or no_adapters):
        raise UserError("--matrix scores every prefix of the run; leave out --upto and --no-adapters.")
    taught_by: list = []
    if data:
        paths = list(data)
    elif run:
        paths, taught_by = stored_eval_sets(select_episodes(source, None if matrix else upto))
    else:
        raise UserError("Give at least one eval set with --data.", hint=f"Example: sd eval {source} --data facts_eval.jsonl")
    sets = [load_eval_set(p, reward) for p in paths]  # every file checked before a model loads
    texts = load_texts(drift) if drift is not None else None
    log = lambda message: console.print(message, markup=False, highlight=False)  # noqa: E731
    common = dict(drift_texts=texts, teacher=teacher, max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)

    if matrix:
        episodes = select_episodes(source, None)
        if data:  # set j is the task of episode j; sets beyond the last episode are not tasks
            taught_by = [j + 1 if j < len(episodes) else None for j in range(len(sets))]
        result, details = evaluate_matrix(source, sets, taught_by, **common)
        header, rows = matrix_table(result)
        _print_table(f"{source}: score R[i][j] on set j after episode i", header, rows)
        if teacher and result.teacher is not None:
            header, rows = matrix_table(result, teacher=True)
            _print_table("teacher: the same model with the demonstration in context", header, rows)
        for line in metrics_lines(result):
            out_print(line)
        if result.drift:
            _print_table("drift on general text", ["model", "KL from base", "perplexity"],
                         [[label, fmt(d["kl_from_base"], 4), fmt(d["perplexity"], 2)] for label, d in zip(result.rows, result.drift)])
        payload = {"source": str(source), "matrix": result.to_json(), "details": details}
    else:
        payload = evaluate_source(source, sets, upto=upto, no_adapters=no_adapters, **common)
        rows = [[r["name"], str(r["n"]), fmt(r["score"]), fmt(r["teacher_score"] if r["teacher_n"] else None),
                 str(r["teacher_n"]), str(r["errors"])] for r in payload["sets"]]
        _print_table(payload["model"], ["set", "n", "score", "teacher", "teacher n", "scorer errors"], rows)
        if payload["drift"]:
            d = payload["drift"]
            out_print(f"drift on {drift}: KL from base {fmt(d['kl_from_base'], 4)}, perplexity {fmt(d['perplexity'], 2)} "
                      f"(base {fmt(d['base_perplexity'], 2)}), {d['tokens']} tokens")
    if out_json is not None:
        from sdcli.core.atomic import write_atomic

        write_atomic(out_json, json.dumps(payload, indent=2))
        console.print(f"wrote {out_json}")


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@app.command(
    epilog="Examples:\n\n"
    "  sd report runs/quickstart                       (writes runs/quickstart/report/)\n\n"
    "  sd report runs/chain --out reports/chain\n\n"
    "  sd report runs/chain --matrix matrix.json       (a matrix from sd eval --matrix --out)",
)
def report(
    run_dir: Path = typer.Argument(..., help="A run folder with episodes/"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG plots and summary.md (default RUN_DIR/report)"),
    matrix: Optional[Path] = typer.Option(
        None, "--matrix", help="Matrix JSON from sd eval --matrix --out (default: built from the episodes' stored eval results)"
    ),
):
    """Plot loss, divergence, reward, the continual-learning matrix and drift; write a Markdown summary."""
    from sdcli.evaluation.continual_matrix import matrix_table, metrics_lines
    from sdcli.evaluation.report import build_report

    result = build_report(run_dir, out_dir, matrix)
    _print_table(f"{run_dir}: {len(result.episode_rows)} episode(s)", result.episode_header, result.episode_rows)
    if result.matrix is not None:
        header, rows = matrix_table(result.matrix)
        _print_table("continual-learning matrix: score on set j after episode i", header, rows)
        for line in metrics_lines(result.matrix):
            out_print(line)
    for path in result.files:
        console.print(f"wrote {path}", markup=False, highlight=False)


def main() -> None:
    click = _click_module()
    try:
        code = app(standalone_mode=False, prog_name="sd")
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except UserError as e:  # raised before a command ran (the commands' own are mapped in _Commands)
        console.print(f"[red]error:[/red] {escape(e.render())}", highlight=False)
        sys.exit(2)
    except Exception as e:
        if os.environ.get("SD_DEBUG"):
            raise
        console.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
        console.print("Run again with SD_DEBUG=1 for the full traceback, and please report it.")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


class _NoKernelsCommunityNote(logging.Filter):
    """bitsandbytes (0.50), imported by peft in every command that loads a model, logs "Failed to load
    CPU gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16 when the `kernels`
    package is absent. That kernel is the fast path sd switches off on every 4-bit layer
    (sdcli.models.quantization.keep_4bit_weights_unpacked), so the line says nothing about sd's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


def quiet_bitsandbytes() -> None:
    """Drop that one line; the logger's other messages still show. Idempotent."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoKernelsCommunityNote) for f in logger.filters):
        logger.addFilter(_NoKernelsCommunityNote())


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit")):
    for key, value in ENV_DEFAULTS.items():  # before any command imports transformers
        os.environ.setdefault(key, value)
    quiet_bitsandbytes()  # before any command imports peft
    if version:
        out.print(f"sd {__version__}")
        raise typer.Exit(0)


if __name__ == "__main__":
    main()
