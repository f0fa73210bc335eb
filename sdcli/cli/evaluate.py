"""sd inspect, sd eval and sd report: what a run learned, token by token, in scores and in plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sdcli.cli import app
from sdcli.cli.output import console, log, out, out_print, print_table
from sdcli.core.errors import UserError


@app.command(
    name="inspect",
    epilog="Examples:\n\n"
    "  sd inspect runs/quickstart --data recipes/data/facts.jsonl --index 0\n\n"
    "  sd inspect runs/quickstart --data recipes/data/facts.jsonl --index 2 --greedy --html teacher.html\n\n"
    "  sd inspect runs/arithmetic --upto 0 --data recipes/data/arithmetic.jsonl --index 3 --samples 8\n\n"
    "  sd inspect runs/quickstart --data recipes/data/facts_eval.jsonl --index 1 --demonstration   "
    "(where the student leaves a held-out line's demonstration)\n\n"
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
    demonstration: bool = typer.Option(
        False, "--demonstration",
        help="Score the example's own demonstration, as off-policy training learns it, instead of responses "
        "drawn from the student (on a held-out line: where the student leaves it)",
    ),
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
    result = inspect_example(run_dir, data, index, upto=upto, greedy=greedy, samples=samples,
                             max_new_tokens=max_new_tokens, seed=seed, demonstration=demonstration, log=log)
    print_inspection(result, out)
    if html_file is not None:
        write_atomic(html_file, render_html(result))
        log(f"wrote {html_file}")


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
    samples: int = typer.Option(
        0, "--samples", min=0, max=256, help="Also draw N answers per line at temperature 1 and report the share right"
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1,
        help="Prompts answered together (default: 32 where sd decodes directly, a Llama-family float model on a CPU; "
        "16 otherwise)",
    ),
    out_json: Optional[Path] = typer.Option(None, "--out", help="Write the results, every answer included, as JSON"),
):
    """Score greedy answers on held-out sets, with the teacher's in-context score beside them."""
    import json

    from sdcli.core.outputs import check_output_file
    from sdcli.evaluation.eval_sets import load_texts
    from sdcli.models.model import quiet_transformers

    quiet_transformers()
    if out_json is not None:  # before the evaluation, whose results would otherwise be lost
        check_output_file(out_json, "--out")
    if matrix and samples:
        raise UserError("--samples scores one model; the matrix is greedy scores only.",
                        hint="Leave out --matrix (sd eval RUN --upto N --samples 8), or leave out --samples.")
    sets, taught_by = _eval_sets(source, data, reward, matrix=matrix, upto=upto, no_adapters=no_adapters)
    texts = load_texts(drift) if drift is not None else None
    common = dict(drift_texts=texts, teacher=teacher, max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    if matrix:
        payload = _eval_matrix(source, sets, taught_by, sets_given=bool(data), **common)
    else:
        payload = _eval_source(source, sets, drift, upto=upto, no_adapters=no_adapters, samples=samples, **common)
    if out_json is not None:
        from sdcli.core.atomic import write_atomic

        write_atomic(out_json, json.dumps(payload, indent=2))
        console.print(f"wrote {out_json}")


def _eval_sets(source: Path, data: list[Path], reward: str, *, matrix: bool, upto: int | None, no_adapters: bool):
    """(the eval sets, every file checked before a model loads; the episode that taught each, for a
    run's own sets): those given with --data, else those the run's stored recipes name."""
    from sdcli.evaluation.eval_sets import load_eval_set, stored_eval_sets
    from sdcli.models.source import is_run_dir, select_episodes

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
    return [load_eval_set(p, reward) for p in paths], taught_by


def _eval_matrix(source: Path, sets: list, taught_by: list, *, sets_given: bool, **common) -> dict:
    """sd eval --matrix: every prefix of the run on every set, printed; returns the JSON payload."""
    from sdcli.core.numbers import fmt
    from sdcli.evaluation.continual_matrix import matrix_table, metrics_lines
    from sdcli.evaluation.evaluate import evaluate_matrix
    from sdcli.models.source import select_episodes

    episodes = select_episodes(source, None)
    if sets_given:  # set j is the task of episode j; sets beyond the last episode are not tasks
        taught_by = [j + 1 if j < len(episodes) else None for j in range(len(sets))]
    result, details = evaluate_matrix(source, sets, taught_by, **common)
    header, rows = matrix_table(result)
    print_table(f"{source}: score R[i][j] on set j after episode i", header, rows)
    if common["teacher"] and result.teacher is not None:
        header, rows = matrix_table(result, teacher=True)
        print_table("teacher: the same model with the demonstration in context", header, rows)
    for line in metrics_lines(result):
        out_print(line)
    if result.drift:
        print_table("drift on general text", ["model", "KL from base", "perplexity"],
                    [[label, fmt(d["kl_from_base"], 4), fmt(d["perplexity"], 2)] for label, d in zip(result.rows, result.drift)])
    return {"source": str(source), "matrix": result.to_json(), "details": details}


def _eval_source(source: Path, sets: list, drift: Path | None, **options) -> dict:
    """sd eval without --matrix: one model on every set, printed; returns the JSON payload."""
    from sdcli.core.numbers import fmt
    from sdcli.evaluation.evaluate import evaluate_source

    payload = evaluate_source(source, sets, **options)
    samples = options.get("samples")
    rows = []
    for r in payload["sets"]:
        rows.append([r["name"], str(r["n"]), fmt(r["score"]), *([fmt(r.get("sampled_score"))] if samples else []),
                     fmt(r["teacher_score"] if r["teacher_n"] else None), str(r["teacher_n"]), fmt(r.get("answer_nll")),
                     fmt(r.get("teacher_answer_nll")), str(r["errors"])])
        for kind, k in r.get("by_kind", {}).items():  # one row per kind of line, under its set
            rows.append([f"  {kind}", str(k["n"]), fmt(k["score"]), *([""] if samples else []),
                         fmt(k["teacher_score"] if k["teacher_n"] else None), str(k["teacher_n"]), "", "", ""])
    header = ["set", "n", "score", *([f"sampled ({samples}/line)"] if samples else []), "teacher", "teacher n",
              "answer NLL", "teacher's", "scorer errors"]
    print_table(payload["model"], header, rows)
    if payload["drift"]:
        d = payload["drift"]
        out_print(f"drift on {drift}: KL from base {fmt(d['kl_from_base'], 4)}, perplexity {fmt(d['perplexity'], 2)} "
                  f"(base {fmt(d['base_perplexity'], 2)}), {d['tokens']} tokens")
    return payload


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
    print_table(f"{run_dir}: {len(result.episode_rows)} episode(s)", result.episode_header, result.episode_rows)
    if result.matrix is not None:
        header, rows = matrix_table(result.matrix)
        print_table("continual-learning matrix: score on set j after episode i", header, rows)
        for line in metrics_lines(result.matrix):
            out_print(line)
    for path in result.files:
        log(f"wrote {path}")
