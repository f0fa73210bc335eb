"""Held-out score against training minutes, self-distillation next to SFT, from fact-benchmark runs.

    python benchmarks/plot_learning.py runs/continual_facts runs/world_facts --out benchmarks/results/learning.png

Each OUT folder of `benchmarks/continual_facts/run.py` holds one run per method (sd/, sft/). For
every episode the plot puts a point at the training minutes spent so far (the steps' own wall
clock, from metrics.jsonl: model loading and evaluation excluded) and two scores: the mean over the
tasks taught so far (what the model knows) and the general questions (what it kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdcli.evaluation.continual_matrix import matrix_from_episodes  # noqa: E402
from sdcli.models.episodes import list_episodes  # noqa: E402


def curve(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    episodes = list_episodes(run_dir)
    matrix = matrix_from_episodes([(e.label, e.meta) for e in episodes])
    minutes, known, general = [0.0], [], []
    general_column = matrix.columns.index("general_qa")
    for i, e in enumerate(episodes):
        rows = [json.loads(line) for line in (e.path / "metrics.jsonl").read_text().splitlines()]
        minutes.append(minutes[-1] + sum(r["time/step_s"] for r in rows) / 60)
        taught = [matrix.scores[i + 1][j] for j, t in enumerate(matrix.taught_by) if t is not None and t <= i + 1]
        known.append(sum(taught) / len(taught))
        general.append(matrix.scores[i + 1][general_column])
    base_general = matrix.scores[0][general_column]
    return minutes, [0.0, *known], [base_general, *general]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", type=Path, help="run.py output folders (each with sd/ and sft/)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(args.benchmarks), 3.4), layout="constrained")
    axes = fig.subplots(1, len(args.benchmarks), squeeze=False)[0]
    for ax, bench in zip(axes, args.benchmarks):
        for method, colour in (("sd", "C0"), ("sft", "C3")):
            if not (bench / method).is_dir():
                continue
            minutes, known, general = curve(bench / method)
            label = "sd (defaults)" if method == "sd" else "SFT"
            ax.plot(minutes, known, color=colour, marker="o", label=f"{label}: tasks taught so far")
            ax.plot(minutes, general, color=colour, marker="s", linestyle="--", label=f"{label}: general questions")
        ax.set_title(bench.name, fontsize=9)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("held-out score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
