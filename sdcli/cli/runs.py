"""sd merge, sd episodes and sd generate: what a run holds, folded, listed or run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sdcli.cli import app
from sdcli.cli.output import console, log, out, out_print
from sdcli.core.errors import UserError
from sdcli.core.metric_names import DIVERGENCE, LOSS, current_names


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
    from sdcli.models.merge import check_into, merge_history
    from sdcli.models.merge.check import DEFAULT_TOLERANCE
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
            tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, force=force, log=log,
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
    log(loaded.description)
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
