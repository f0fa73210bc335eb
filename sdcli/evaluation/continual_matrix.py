"""The continual-learning matrix and its summary numbers (Lopez-Paz & Ranzato 2017, GEM).

R[i][j] is the score on eval set j after episode i. Row 0 is the base model, and rows 1..E are
after episodes 1..E. Set j may be the task of an episode: e_j is the episode that taught it, and
sets that no episode taught (general prompts, extra sets) have no e_j and stay out of the summary.
When the tasks are the first T sets and e_j = j, the formulas below are GEM's exactly, with the
base model in place of GEM's randomly initialised b_j:

    ACC = 1/T     sum_{j=1..T}   R[T][j]                      average score after the last episode
    BWT = 1/(T-1) sum_{j=1..T-1} (R[T][j] - R[j][j])          backward transfer; < 0 is forgetting
    FWT = 1/(T-1) sum_{j=2..T}   (R[j-1][j] - R[0][j])        forward transfer from earlier episodes

In general the last row E takes the place of T. ACC is the mean over task sets of R[E][j]. BWT
is the mean over tasks with e_j < E of R[E][j] - R[e_j][j]. FWT is the mean over tasks with
e_j >= 2 of R[e_j - 1][j] - R[0][j]. A missing cell (None) drops its term, and a mean with no
terms is None. Everything here is plain Python on lists, so the tests check it against
hand-computed values.

`matrix_from_episodes` builds R from what the training loop stored in each episode.json (see
evaluate.episode_eval). Sets are identified by their content hash. Row i comes from episode i's
"after" scores. R[e_j - 1][j] and R[0][j] come from the task set's "before" and "base"
baselines when that row has no score of its own for set j.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sdcli.core.numbers import fmt

Cell = float | None


@dataclass
class Matrix:
    rows: list[str]  # "base", then episode labels "001-name", ...
    columns: list[str]  # eval set names
    scores: list[list[Cell]]  # [rows][columns]
    taught_by: list[int | None]  # per column: the episode (1-based) whose task it is, or None
    teacher: list[list[Cell]] | None = None  # the same cells with the demonstration in context
    keys: list[str] = field(default_factory=list)  # per column: sha256 of the set, when known
    drift: list[dict | None] | None = None  # per row: {"kl_from_base", "perplexity", ...}

    def metrics(self) -> dict[str, Cell]:
        return gem_metrics(self.scores, self.taught_by)

    def to_json(self) -> dict:
        return {**asdict(self), "metrics": self.metrics()}

    @classmethod
    def from_json(cls, data: dict) -> "Matrix":
        fields = ("rows", "columns", "scores", "taught_by", "teacher", "keys", "drift")
        return cls(**{k: data[k] for k in fields if k in data})


def _mean(values: list[float]) -> Cell:
    return sum(values) / len(values) if values else None


def gem_metrics(R: list[list[Cell]], taught_by: list[int | None]) -> dict[str, Cell]:
    """ACC, BWT and FWT as defined in the module docstring. `R` has rows 0..E."""
    last = len(R) - 1
    tasks = [(j, e) for j, e in enumerate(taught_by) if e is not None and 1 <= e <= last]
    acc = [R[last][j] for j, _ in tasks if R[last][j] is not None]
    bwt = [R[last][j] - R[e][j] for j, e in tasks if e < last and R[last][j] is not None and R[e][j] is not None]
    fwt = [R[e - 1][j] - R[0][j] for j, e in tasks if e >= 2 and R[e - 1][j] is not None and R[0][j] is not None]
    return {"acc": _mean(acc), "bwt": _mean(bwt), "fwt": _mean(fwt), "tasks": len(tasks)}


def matrix_from_episodes(episodes: list[tuple[str, dict]]) -> Matrix | None:
    """Assemble R from [(label, episode.json dict), ...] in order; None when no episode was evaluated."""
    evaluated = [(label, meta.get("eval")) for label, meta in episodes]
    if not any(ev and ev.get("sets") for _, ev in evaluated):
        return None
    keys: list[str] = []
    names: dict[str, str] = {}
    taught: dict[str, int] = {}
    for number, (_, ev) in enumerate(evaluated, start=1):  # task columns first, in episode order
        for s in (ev or {}).get("sets", []):
            if s["role"] == "task" and s["sha256"] not in taught:
                taught[s["sha256"]] = number
                keys.append(s["sha256"])
                names[s["sha256"]] = s["name"]
    for _, ev in evaluated:
        for s in (ev or {}).get("sets", []):
            if s["sha256"] not in names:
                keys.append(s["sha256"])
                names[s["sha256"]] = s["name"]
    rows = ["base"] + [label for label, _ in episodes]
    scores: list[list[Cell]] = [[None] * len(keys) for _ in rows]
    teacher: list[list[Cell]] = [[None] * len(keys) for _ in rows]
    drift: list[dict | None] = [None] * len(rows)
    for i, (_, ev) in enumerate(evaluated, start=1):
        for s in (ev or {}).get("sets", []):
            j = keys.index(s["sha256"])
            scores[i][j], teacher[i][j] = s.get("score"), s.get("teacher_score")
        if ev and ev.get("drift"):
            drift[i] = ev["drift"]
            if drift[0] is None and ev["drift"].get("base_perplexity") is not None:
                drift[0] = {"kl_from_base": 0.0, "perplexity": ev["drift"]["base_perplexity"], "path": ev["drift"].get("path")}
    for i, (_, ev) in enumerate(evaluated, start=1):  # baselines fill only cells no row filled itself
        for s in (ev or {}).get("sets", []):
            j = keys.index(s["sha256"])
            for row, which in ((i - 1, "before"), (0, "base")):
                if which in s and scores[row][j] is None:
                    scores[row][j], teacher[row][j] = s[which].get("score"), s[which].get("teacher_score")
    return Matrix(
        rows=rows, columns=[names[k] for k in keys], scores=scores, taught_by=[taught.get(k) for k in keys],
        teacher=teacher, keys=keys, drift=drift if any(d is not None for d in drift) else None,
    )


def matrix_table(matrix: Matrix, teacher: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of R as text, for the terminal and Markdown; a trailing column holds the row mean."""
    cells = matrix.teacher if teacher and matrix.teacher is not None else matrix.scores
    header = ["model"] + [
        f"{name} (task {e})" if e is not None else name for name, e in zip(matrix.columns, matrix.taught_by)
    ] + ["mean"]
    rows = []
    for label, row in zip(matrix.rows, cells):
        present = [v for v in row if v is not None]
        rows.append([label] + [fmt(v, 2) for v in row] + [fmt(_mean(present), 2)])
    return header, rows


def metrics_lines(matrix: Matrix) -> list[str]:
    m = matrix.metrics()
    return [
        f"ACC (average score after the last episode, over {m['tasks']} task(s)): {fmt(m['acc'])}",
        f"BWT (backward transfer; negative = forgetting): {fmt(m['bwt'], sign=True)}",
        f"FWT (forward transfer vs. the base model): {fmt(m['fwt'], sign=True)}",
    ]
