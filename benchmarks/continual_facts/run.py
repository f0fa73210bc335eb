"""Continual facts: three episodes of fictional facts, self-distillation against SFT.

    python benchmarks/continual_facts/run.py                        # both methods, 36 steps per episode
    python benchmarks/continual_facts/run.py --steps 2              # smoke test, a few minutes
    python benchmarks/continual_facts/run.py --methods sft --out runs/cf --force
    python benchmarks/continual_facts/run.py --bench benchmarks/world_facts     # the second, untuned benchmark

Each episode teaches six fictional facts (task1: the Kingdom of Veloria, task2: the skyloom,
task3: three creatures), given only as demonstrations, to the built-in SmolLM2-135M-Instruct.
Every episode is evaluated by the training loop itself, from the `eval:` section of its recipe.
Greedy answers to held-out paraphrases of all three tasks are scored with `contains` (a few
lines use numeric or regex), and so are forty general questions (the base model answers about
two thirds). Drift is measured on general text. The loop scores the task set with the model as
the episode began and with the bare base too, so the episode.json files alone fill the
continual-learning matrix R[i][j] (row 0 = base, row i = after episode i):

    ACC = mean_j R[3][j]      BWT = mean_{j<3} R[3][j] - R[j][j]      FWT = mean_{j>=2} R[j-1][j] - R[0][j]

The same three recipes run once with `method: self_distillation` and once with `method: sft` (an
override, so the two arms cannot drift apart). The runner prints both matrices, the answers after
each episode that give its facts to other questions ("The capital of Japan is Saltmarrow.";
README, "Leaks"), and a comparison table, writes `sd report` plots for each arm, and saves the
numbers in OUT/results.json.

Cost on 2 CPU cores (fp32, shipped defaults, 2026-12-01, AMD EPYC AVX2): the SD arm takes
9.3 minutes on continual_facts (seed 1) and 13.4 on world_facts (seed 0), of which training is about half (2.8-4.5 s
a step) and the evaluation after each episode (the task and retain sets with the teacher beside
them, the baselines, drift) 1.2-2.3 minutes an episode. Run nothing else on those cores meanwhile:
two torch processes on 2 cores slowed one SD step from 7 s to 160 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from sdcli.evaluation.continual_matrix import matrix_from_episodes, matrix_table, metrics_lines  # noqa: E402
from sdcli.evaluation.leaks import describe_leaks  # noqa: E402
from sdcli.core.numbers import fmt  # noqa: E402
from sdcli.models.episodes import list_episodes  # noqa: E402

METHODS = {"sd": "self_distillation", "sft": "sft"}
KINDS = ("direct", "paraphrase", "situation")


def train_arm(method: str, run_dir: Path, steps: int | None, threads: int, extra: list[str], recipes: list[Path]) -> float:
    overrides = [f"run_dir={run_dir}", f"method={METHODS[method]}", f"train.threads={threads}", *extra]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    command = [sys.executable, "-m", "sdcli.cli", "train", *map(str, recipes), *overrides, "--quiet"]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"training the {method} arm failed (exit {done.returncode})")
    return time.perf_counter() - started


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def summarise(method: str, run_dir: Path, seconds: float) -> dict:
    episodes = list_episodes(run_dir)
    matrix = matrix_from_episodes([(e.label, e.meta) for e in episodes])
    if matrix is None:
        sys.exit(f"{run_dir}: no eval results in episode.json (did the recipes lose their eval section?)")
    header, rows = matrix_table(matrix)
    print_table(f"[{method}] score R[i][j] on set j after episode i", header, rows)
    header, rows = matrix_table(matrix, teacher=True)
    print_table(f"[{method}] teacher: the same model with the demonstration in context", header, rows)
    for line in metrics_lines(matrix):
        print(f"[{method}] {line}")
    by_kind = kind_scores(episodes)
    if by_kind:
        print_table(f"[{method}] each episode's own task, by kind of held-out question",
                    ["episode", *KINDS], [[label, *(fmt(v) for v in row)] for label, row in by_kind])
    leaked = episode_leaks(episodes)
    for label, by_set in leaked.items():
        print(f"[{method}] {label}: answers giving its facts where they did not before: "
              + "; ".join(f"{name} {describe_leaks([leak])}" for name, leak in by_set.items()))
    last_drift = (matrix.drift or [None])[-1] or {}
    general = matrix.columns.index("general_qa") if "general_qa" in matrix.columns else None
    return {
        "method": METHODS[method],
        "run_dir": str(run_dir),
        "seconds": round(seconds, 1),
        "steps": [e.meta["steps"] for e in episodes],
        "metrics": matrix.metrics(),
        "general_qa": [row[general] for row in matrix.scores] if general is not None else None,
        "drift_kl_after_last": last_drift.get("kl_from_base"),
        "perplexity_after_last": last_drift.get("perplexity"),
        "matrix": matrix.to_json(),
        "task_by_kind": {label: dict(zip(KINDS, row)) for label, row in by_kind},
        "leaked": leaked,
    }


def episode_leaks(episodes) -> dict[str, dict[str, dict]]:
    """{episode: {retain set: its leak}}: the episode's answers in the set's answers after it, where
    the same questions did not give them before (episode.json's `leaked`; README, "Leaks")."""
    out = {}
    for e in episodes:
        sets = (e.meta.get("eval") or {}).get("sets", [])
        by_set = {s["name"]: s["leaked"] for s in sets if s.get("role") == "retain" and "leaked" in s}
        if by_set:
            out[e.label] = by_set
    return out


def kind_scores(episodes) -> list[tuple[str, list[float | None]]]:
    """Right after each episode, its own task's score per kind of question (the eval lines' `kind`,
    as eval.json's `by_kind` holds it); empty when the eval sets do not name kinds."""
    out = []
    for e in episodes:
        path = e.path / "eval.json"
        if not path.is_file():
            continue
        sets = json.loads(path.read_text())["sets"]
        task = next((s for s in sets if s.get("role") == "task" and s.get("model") == "after"), None)
        by_kind = (task or {}).get("by_kind") or {}
        row = [by_kind[kind]["score"] if kind in by_kind else None for kind in KINDS]
        if any(v is not None for v in row):
            out.append((e.label, row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps per episode (default: the recipes' 36)")
    parser.add_argument("--methods", default="sd,sft", help="comma-separated: sd, sft")
    parser.add_argument("--bench", type=Path, default=HERE,
                        help="folder with task1.yaml, task2.yaml, task3.yaml (default: continual_facts; the second, "
                        "untuned benchmark is benchmarks/world_facts)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<bench folder name>")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    parser.add_argument("--force", action="store_true", help="Delete earlier runs in --out first")
    parser.add_argument("overrides", nargs="*", help="Extra key=value recipe overrides, e.g. train.lr=1e-3")
    args = parser.parse_args()

    recipes = [args.bench / f"task{i}.yaml" for i in (1, 2, 3)]
    args.out = args.out or REPO / "runs" / args.bench.resolve().name
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; expected some of {sorted(METHODS)}")
    results = []
    for method in methods:
        run_dir = args.out / method
        if run_dir.exists():
            if not args.force:
                sys.exit(f"{run_dir} exists; pass --force to replace it (episodes would stack on the old ones)")
            shutil.rmtree(run_dir)
        seconds = train_arm(method, run_dir, args.steps, args.threads, args.overrides, recipes)
        results.append(summarise(method, run_dir, seconds))
        report = subprocess.run([sys.executable, "-m", "sdcli.cli", "report", str(run_dir), "--out", str(run_dir / "report")],
                                cwd=REPO, capture_output=True, text=True)
        print(f"[{method}] plots and summary: {run_dir / 'report'}" if report.returncode == 0
              else f"[{method}] sd report failed (is matplotlib installed?):\n{report.stderr}")

    rows = [[r["method"], fmt(r["metrics"]["acc"]), fmt(r["metrics"]["bwt"]), fmt(r["metrics"]["fwt"]),
             fmt((r["general_qa"] or [None])[0]), fmt((r["general_qa"] or [None])[-1]),
             fmt(r["drift_kl_after_last"], 4), fmt(r["perplexity_after_last"], 2), f"{r['seconds'] / 60:.1f}"]
            for r in results]
    print_table("comparison (after the last episode)",
                ["method", "ACC", "BWT", "FWT", "general QA base", "general QA after", "KL from base", "perplexity", "minutes"],
                rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
