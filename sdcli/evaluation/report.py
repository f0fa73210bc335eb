"""`sd report`: plots and a short Markdown summary of a run, written next to each other.

    training.png   loss, divergence, the learning view (demonstration NLL under both roles, the
                   roles' disagreement, how sparse the per-token advantage is, the anchor loss)
                   and reward (when the signal has one) per step. The x axis is
                   the step counted across the whole run, one colour per episode, from each
                   episode's metrics.jsonl.
    matrix.png     the continual-learning matrix R as a heat map: the student and, when
                   measured, the teacher (the same model with the demonstration in context).
    drift.png      mean per-token KL from the base model, and perplexity on general text, for
                   the base and after each episode.
    summary.md     one row per episode, the matrix, ACC / BWT / FWT and links to the plots.

The matrix comes from a `sd eval RUN_DIR --matrix --out FILE.json` file when one is given.
Otherwise it is assembled from the eval results the training loop stored in each episode.json
(see continual_matrix.matrix_from_episodes). A plot whose data is absent is not drawn.
matplotlib is an optional dependency (`pip install 'sd[plot]'`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.core.atomic import write_atomic
from sdcli.core.errors import UserError, write_error
from sdcli.core.metric_names import DEMO_NLL_STUDENT, DEMO_NLL_TEACHER, DIVERGENCE, LOSS, current_names
from sdcli.core.numbers import fmt
from sdcli.evaluation.scoring import describe_kinds
from sdcli.core.outputs import check_output_folder
from sdcli.evaluation.continual_matrix import Matrix, matrix_from_episodes, matrix_table, metrics_lines
from sdcli.evaluation.leaks import describe_leaks
from sdcli.models.episodes import Episode, list_episodes


@dataclass
class Report:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    episode_header: list[str] = field(default_factory=list)
    episode_rows: list[list[str]] = field(default_factory=list)
    matrix: Matrix | None = None
    markdown: str = ""


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "sd report draws its plots with matplotlib, which is not installed.",
            hint="Install the optional extra: pip install 'sd[plot]'   (or: pip install matplotlib)",
        ) from None
    return Figure


def read_metrics(episode: Episode) -> list[dict]:
    """The episode's metrics.jsonl, one dict per step, under today's names (older runs wrote `loss`, `kl`, ...)."""
    path = episode.path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(current_names(json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line cut by a crash is not worth failing a report over
    return rows


def load_matrix_file(path: Path) -> Matrix:
    """A matrix JSON written by `sd eval --matrix --out` (the whole file, or its "matrix" key)."""
    from sdcli.core.data import read_text

    hint = "Write one with: sd eval RUN_DIR --matrix --out matrix.json"
    text = read_text(Path(path), UserError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--matrix {path}:{e.lineno}: not valid JSON ({e.msg}).", hint=hint) from None
    except RecursionError:
        raise UserError(f"--matrix {path}: nested too deeply to read; a matrix file has a few levels.", hint=hint) from None
    try:
        matrix = Matrix.from_json(data.get("matrix", data))
    except (TypeError, KeyError, AttributeError) as e:
        raise UserError(f"--matrix {path}: not a matrix file ({type(e).__name__}: {e}).", hint=hint) from None
    problem = _matrix_problem(matrix)
    if problem:
        raise UserError(f"--matrix {path}: not a matrix file ({problem}).", hint=hint)
    return matrix


def _matrix_problem(m: Matrix) -> str | None:
    """What is wrong with the shape of a matrix read from a file, or None."""
    def cells(grid, name):
        if not isinstance(grid, list) or len(grid) != len(m.rows):
            return f"'{name}' must have one row per entry of 'rows' ({len(m.rows)})"
        for row in grid:
            if not isinstance(row, list) or len(row) != len(m.columns):
                return f"each row of '{name}' must have one cell per entry of 'columns' ({len(m.columns)})"
            if any(c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))) for c in row):
                return f"the cells of '{name}' must be numbers or null"
        return None

    if not isinstance(m.rows, list) or not isinstance(m.columns, list):
        return "'rows' and 'columns' must be lists"
    if not isinstance(m.taught_by, list) or len(m.taught_by) != len(m.columns):
        return "'taught_by' must have one entry per column"
    if any(t is not None and (isinstance(t, bool) or not isinstance(t, int)) for t in m.taught_by):
        return "'taught_by' entries must be episode numbers or null"
    return cells(m.scores, "scores") or (cells(m.teacher, "teacher") if m.teacher is not None else None)


# ---------------------------------------------------------------------------------------------
# Tables (pure)


def episode_table(episodes: list[Episode]) -> tuple[list[str], list[list[str]]]:
    header = ["#", "episode", "method", "signal", "steps", "final loss", "final divergence",
              "demo NLL student / teacher", "disagreement", "task score", "teacher", "task by kind", "retain (mean)",
              "leaked answers", "KL from base", "perplexity"]
    rows = []
    for e in episodes:
        m, final = e.meta, current_names(e.meta.get("final", {}))
        ev = m.get("eval") or {}
        sets = ev.get("sets", [])
        task = next((s for s in sets if s["role"] == "task"), None)
        retain = [s["score"] for s in sets if s["role"] == "retain" and s.get("score") is not None]
        drift = ev.get("drift") or {}
        rows.append([
            f"{e.number:03d}", e.name, m.get("method", "?"), m.get("signal", "?"), str(m.get("steps", "?")),
            fmt(final.get(LOSS), 4), fmt(final.get(DIVERGENCE), 4),
            f"{fmt(final.get(DEMO_NLL_STUDENT), 3)} / {fmt(final.get(DEMO_NLL_TEACHER), 3)}",
            fmt(final.get("learn/disagreement"), 3),
            fmt(task["score"] if task else None), fmt(task.get("teacher_score") if task else None),
            describe_kinds((task or {}).get("by_kind", {})) or "-",
            fmt(sum(retain) / len(retain) if retain else None),
            describe_leaks([s["leaked"] for s in sets if s["role"] == "retain" and "leaked" in s]),
            fmt(drift.get("kl_from_base"), 4), fmt(drift.get("perplexity"), 2),
        ])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _finite(values) -> bool:
    return any(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
    return path


TRAINING_PANELS = [
    ("loss", [(LOSS, "-")]),
    ("divergence (student vs teacher, per token)", [(DIVERGENCE, "-")]),
    # the knowledge moving in: the demonstrations' NLL under the student (solid) falls toward the
    # teacher's (dashed), which sees the demonstration in its context
    ("demonstration NLL per token: student (solid), teacher (dashed)",
     [(DEMO_NLL_STUDENT, "-"), (DEMO_NLL_TEACHER, "--")]),
    ("share of positions where the roles' top tokens differ", [("learn/disagreement", "-")]),
    ("sampled tokens with |log p_teacher - log p_student| > 1", [("advantage/large_fraction", "-")]),
    ("anchor loss (drift from the starting model on everyday prompts)", [("loss/anchor", "-")]),
]


def training_panels(metrics: list[list[dict]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels of training.png that have data: (title, [(metric key, line style)])."""
    panels = list(TRAINING_PANELS)
    reward_key = next((k for k in ("signal/reward_mean", "signal/success_rate")
                       if any(k in r for rows in metrics for r in rows)), None)
    if reward_key:
        panels.append((reward_key, [(reward_key, "-")]))
    return [(t, keys) for t, keys in panels
            if any(_finite([r.get(k) for r in rows]) for rows in metrics for k, _ in keys)]


def plot_training(Figure, episodes: list[Episode], metrics: list[list[dict]], path: Path) -> Path | None:
    panels = training_panels(metrics)
    if not panels:
        return None
    fig = Figure(figsize=(7, 2.4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    offset = 0
    for index, (episode, rows) in enumerate(zip(episodes, metrics)):
        steps = [offset + r.get("step", i + 1) for i, r in enumerate(rows)]
        colour = f"C{index % 10}"
        for ax, (_, keys) in zip(axes, panels):
            for n, (key, style) in enumerate(keys):
                values = [r.get(key, float("nan")) for r in rows]
                values = [float("nan") if v is None else v for v in values]
                ax.plot(steps, values, color=colour, linestyle=style, marker="." if len(steps) < 30 else None,
                        label=f"{episode.label} ({episode.meta.get('method', '?')})" if n == 0 else None)
        if index:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", linewidth=0.6, linestyle=":")
        offset += len(rows)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step (across the run)")
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_matrix(Figure, matrix: Matrix, path: Path) -> Path:
    import matplotlib
    import numpy as np

    grids = [("student", matrix.scores)]
    if matrix.teacher is not None and any(v is not None for row in matrix.teacher for v in row):
        grids.append(("teacher (demonstration in context)", matrix.teacher))
    values = [v for _, g in grids for row in g for v in row if v is not None]
    unit = all(0.0 <= v <= 1.0 for v in values)
    width = 1.6 + len(grids) * max(2.6, 1.1 * len(matrix.columns))
    fig = Figure(figsize=(width, 1.8 + 0.5 * len(matrix.rows)), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    for ax, (title, grid) in zip(axes, grids):
        data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float))
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(data, cmap=cmap, vmin=0.0 if unit else None, vmax=1.0 if unit else None, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, fmt(v, 2), ha="center", va="center", fontsize=8,
                        color="dimgray" if v is None else "black" if unit and v > 0.6 else "white")
        ax.set_xticks(range(len(matrix.columns)))
        ax.set_xticklabels([c if e is None else f"{c}\n(task {e})" for c, e in zip(matrix.columns, matrix.taught_by)],
                           fontsize=7, rotation=30, ha="right")
        ax.set_yticks(range(len(matrix.rows)))
        ax.set_yticklabels(matrix.rows, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("eval set", fontsize=8)
    axes[0].set_ylabel("model after", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.9)
    m = matrix.metrics()
    fig.suptitle(f"ACC {fmt(m['acc'])}   BWT {fmt(m['bwt'])}   FWT {fmt(m['fwt'])}", fontsize=9)
    return _save(fig, path)


def plot_drift(Figure, matrix: Matrix, path: Path) -> Path | None:
    rows = [(label, d) for label, d in zip(matrix.rows, matrix.drift or []) if d is not None]
    if not rows:
        return None
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(rows)), 4.6), layout="constrained")
    ax_kl, ax_ppl = fig.subplots(2, 1, sharex=True)
    x = list(range(len(rows)))
    kl = [d.get("kl_from_base") for _, d in rows]
    ppl = [d.get("perplexity") for _, d in rows]
    ax_kl.plot(x, [float("nan") if v is None else v for v in kl], marker="o")
    ax_kl.set_title("mean per-token KL(model || base) on general text", fontsize=9)
    ax_ppl.plot(x, [float("nan") if v is None else v for v in ppl], marker="o", color="C1")
    ax_ppl.set_title("perplexity on general text", fontsize=9)
    ax_ppl.set_xticks(x)
    ax_ppl.set_xticklabels([label for label, _ in rows], fontsize=7, rotation=30, ha="right")
    for ax in (ax_kl, ax_ppl):
        ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------


def build_report(run_dir: Path, out_dir: Path | None = None, matrix_file: Path | None = None) -> Report:
    """Write the plots and summary.md for `run_dir` into `out_dir` (default run_dir/report)."""
    run_dir = Path(run_dir)
    if not (run_dir / "episodes").is_dir():
        raise UserError(f"{run_dir} is not a run folder (no episodes/ inside).", hint="Example: sd report runs/quickstart")
    episodes = list_episodes(run_dir)
    if not episodes:
        raise UserError(f"{run_dir} has no finished episodes yet.")
    option = "--out" if out_dir is not None else "the report folder (choose another with --out)"
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    check_output_folder(out_dir, option)
    matrix = load_matrix_file(matrix_file) if matrix_file else matrix_from_episodes([(e.label, e.meta) for e in episodes])
    Figure = require_matplotlib()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out_dir) or e from None

    report = Report(out_dir)
    report.matrix = matrix
    metrics = [read_metrics(e) for e in episodes]
    report.episode_header, report.episode_rows = episode_table(episodes)

    for made in (
        plot_training(Figure, episodes, metrics, out_dir / "training.png"),
        plot_matrix(Figure, report.matrix, out_dir / "matrix.png") if report.matrix else None,
        plot_drift(Figure, report.matrix, out_dir / "drift.png") if report.matrix else None,
    ):
        if made is not None:
            report.files.append(made)

    md = [f"# sd report: {run_dir}", "", f"{len(episodes)} episode(s).", "",
          markdown_table(report.episode_header, report.episode_rows), ""]
    if report.matrix is not None:
        source = f"from {matrix_file}" if matrix_file else "from the eval results stored in each episode.json"
        header, rows = matrix_table(report.matrix)
        md += ["## Continual-learning matrix", "", f"R[i][j] = score on set j after episode i ({source}).", "",
               markdown_table(header, rows), ""]
        if report.matrix.teacher is not None and any(v is not None for r in report.matrix.teacher for v in r):
            header, rows = matrix_table(report.matrix, teacher=True)
            md += ["Teacher (the same model with the demonstration in context):", "", markdown_table(header, rows), ""]
        md += [f"- {line}" for line in metrics_lines(report.matrix)] + [""]
    else:
        md += ["No evaluation results: add an `eval:` section to the recipes, or pass `--matrix` "
               "(from `sd eval RUN_DIR --matrix --out matrix.json`).", ""]
    md += [f"![{p.stem}]({p.name})" for p in report.files]
    report.markdown = "\n".join(md) + "\n"
    summary = out_dir / "summary.md"
    write_atomic(summary, report.markdown)
    report.files.append(summary)
    return report
