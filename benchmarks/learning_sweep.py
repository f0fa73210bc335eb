"""Sweep training settings on one fact-learning episode and print learning, forgetting and time.

    python benchmarks/learning_sweep.py                                   # the default grid
    python benchmarks/learning_sweep.py --task benchmarks/world_facts/task1.yaml
    python benchmarks/learning_sweep.py --only off1 mix50 --seeds 0 1

Each setting trains the task's first episode from the bare base (recipe defaults plus the
setting's overrides) and is scored by the training loop's own evaluation: the task's held-out
questions (next to the teacher's ceiling: the base model with the fact in its prompt), forty
general questions (the base model answers about two thirds) (forgetting), and drift on general text (KL from
the base and perplexity). All settings run one after another in one invocation, so their
wall-clock times are comparable with each other (this machine drifts +-20% between hours; do not
compare numbers across invocations). Results go to OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GENERAL = HERE / "continual_facts" / "data" / "general_qa.jsonl"

from continual_facts.run import KINDS, kind_scores  # noqa: E402  (the runner's reading of the question kinds)
from sdcli.models.episodes import list_episodes  # noqa: E402

# the MLPs of SmolLM2-135M's layers 4-15, where knowledge editors (ROME, MEMIT) write a fact
MIDDLE_MLPS = ",".join(f"layers.{i}.mlp.{m}" for i in range(4, 16) for m in ("gate_proj", "up_proj", "down_proj"))

# name -> overrides on top of the recipe and the product's defaults
GRID: dict[str, list[str]] = {
    "on-policy": ["rollout.off_policy_fraction=0"],
    "off1": ["rollout.off_policy_fraction=1"],
    "off1-lr2e-4": ["rollout.off_policy_fraction=1", "train.lr=2e-4"],
    "off1-r4": ["rollout.off_policy_fraction=1", "lora.r=4", "lora.alpha=8"],
    "off1-ema": ["rollout.off_policy_fraction=1", "teacher=ema"],
    "off1-topk": ["rollout.off_policy_fraction=1", "loss.support=topk", "loss.topk=20"],
    "mix50": ["rollout.off_policy_fraction=0.5"],
    "mix50-upr2": ["rollout.off_policy_fraction=0.5", "train.updates_per_rollout=2"],
    "mix50-t0.7": ["rollout.off_policy_fraction=0.5", "rollout.temperature=0.7"],
    "mix50-g2": ["rollout.off_policy_fraction=0.5", "rollout.num_samples=2"],
    "mix75": ["rollout.off_policy_fraction=0.75"],
    "sft": ["method=sft"],
    "sft-ep24": ["method=sft", "train.epochs=24"],  # memorised for certain: what a fine-tune on the lines can reach
    "off1-anchor2": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=2"],
    "off1-anchor4": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=4"],
    "off1-anchor4-lr2e-4": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=4", "train.lr=2e-4"],
    "mix50-anchor4": ["rollout.off_policy_fraction=0.5", "anchor.prompts_per_step=4"],
    "off1-anchor8": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=8"],
    "off1-anchor4-lr3e-4": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=4", "train.lr=3e-4"],
    "mix50-anchor4-lr3e-4": ["rollout.off_policy_fraction=0.5", "anchor.prompts_per_step=4", "train.lr=3e-4"],
    "off1-anchor4-lr1e-3": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=4", "train.lr=1e-3"],
    "off1-anchor4-60steps": ["rollout.off_policy_fraction=1", "anchor.prompts_per_step=4", "train.max_steps=60"],
    "defaults": [],
    "no-word-dropout": ["data.prompt_word_dropout=0"],  # the defaults before 2026-11-30 15:00
    "word-dropout-0.4": ["data.prompt_word_dropout=0.4"],
    "no-shuffle": ["data.prompt_word_shuffle=0"],  # the defaults before 2026-12-01 01:30
    "tt0.5": ["loss.teacher_temperature=0.5"],
    "tt0.25": ["loss.teacher_temperature=0.25"],
    "tt0.5-anchor8": ["loss.teacher_temperature=0.5", "anchor.prompts_per_step=8"],
    "tt0.5-lr2e-4": ["loss.teacher_temperature=0.5", "train.lr=2e-4"],
    "tt0.5-ep6": ["loss.teacher_temperature=0.5", "train.epochs=6"],
    "tt0.5-cosine": ["loss.teacher_temperature=0.5", "train.lr_schedule=cosine"],
    "tt0.5-r4": ["loss.teacher_temperature=0.5", "lora.r=4", "lora.alpha=8"],
    "tt0.5-aw3": ["loss.teacher_temperature=0.5", "anchor.weight=3"],
    "tt0.5-aw6": ["loss.teacher_temperature=0.5", "anchor.weight=6"],
    "aw3": ["anchor.weight=3"],
    "no-anchor": ["anchor.prompts_per_step=0"],
    "no-anchor-lr2e-4": ["anchor.prompts_per_step=0", "train.lr=2e-4"],
    "no-anchor-tt1": ["anchor.prompts_per_step=0", "loss.teacher_temperature=1"],
    "no-anchor-ep6": ["anchor.prompts_per_step=0", "train.epochs=6"],
    "no-anchor-ep4": ["anchor.prompts_per_step=0", "train.epochs=4"],
    "no-anchor-ep6-lr3e-4": ["anchor.prompts_per_step=0", "train.epochs=6", "train.lr=3e-4"],
    "ep6": ["train.epochs=6"],
    "ep6-aw2": ["train.epochs=6", "anchor.weight=2"],
    "ep6-a2-aw1": ["train.epochs=6", "anchor.prompts_per_step=2", "anchor.weight=1"],
    "lr1e-3": ["train.lr=1e-3"],
    "ep20": ["train.epochs=20"],
    "ep16": ["train.epochs=16"],
    "lora-dropout-0.1": ["lora.dropout=0.1"],
    "tt0.25-ep20": ["loss.teacher_temperature=0.25", "train.epochs=20"],
    "aw1": ["anchor.weight=1"],
    "aw2": ["anchor.weight=2"],
    "a2-aw3": ["anchor.prompts_per_step=2", "anchor.weight=3"],
    "a2-aw1": ["anchor.prompts_per_step=2", "anchor.weight=1"],
    "a4-aw1-16t": ["anchor.weight=1", "anchor.max_new_tokens=16"],
    "mix50-tt0.5": ["rollout.off_policy_fraction=0.5", "loss.teacher_temperature=0.5"],
    "mix50-tt0.5-24t": ["rollout.off_policy_fraction=0.5", "loss.teacher_temperature=0.5", "rollout.max_new_tokens=24"],
    "mix25-tt0.5": ["rollout.off_policy_fraction=0.75", "loss.teacher_temperature=0.5"],
    "a16": ["anchor.max_new_tokens=16"],
    "mlp": ["lora.target_modules=[gate_proj,up_proj,down_proj]"],
    "mlp-lr1e-3": ["lora.target_modules=[gate_proj,up_proj,down_proj]", "train.lr=1e-3"],
    "ema": ["teacher=ema"],
    "ta4": ["rollout.teacher_answers=4"],
    "ta1-greedy": ["rollout.teacher_answers=1", "rollout.teacher_answer_temperature=0"],
    "ta4-no-anchor": ["rollout.teacher_answers=4", "anchor.prompts_per_step=0"],
    "ta4-a2": ["rollout.teacher_answers=4", "anchor.prompts_per_step=2"],
    "mix50-greedy-tt0.5": ["rollout.off_policy_fraction=0.5", "rollout.temperature=0", "loss.teacher_temperature=0.5"],
    # every visit both ways: twice the prompts a step, half of them sampled (the student's own frame), same steps
    "both-greedy": ["train.prompts_per_step=8", "rollout.off_policy_fraction=0.5", "train.epochs=24",
                    "rollout.temperature=0", "loss.teacher_temperature=0.25"],
    "both-sampled": ["train.prompts_per_step=8", "rollout.off_policy_fraction=0.5", "train.epochs=24",
                     "loss.teacher_temperature=0.25"],
    "r32": ["lora.r=32", "lora.alpha=64"],
    "r64": ["lora.r=64", "lora.alpha=128"],
    "r64-a64": ["lora.r=64", "lora.alpha=64"],
    "midmlp": [f"lora.target_modules=[{MIDDLE_MLPS}]"],
    "midmlp-lr1e-3": [f"lora.target_modules=[{MIDDLE_MLPS}]", "train.lr=1e-3"],
    # LoRA+: the B matrices at train.lr times the ratio
    "lp4": ["lora.b_lr_ratio=4"],
    "lp8": ["lora.b_lr_ratio=8"],
    "lp16": ["lora.b_lr_ratio=16"],
    "lp16-warmup12": ["lora.b_lr_ratio=16", "train.warmup_steps=12"],
    "lp16-lr1.25e-4": ["lora.b_lr_ratio=16", "train.lr=1.25e-4"],
    "lp16-aw20": ["lora.b_lr_ratio=16", "anchor.weight=20"],
}


def run_setting(task: Path, name: str, overrides: list[str], seed: int, out: Path, threads: int) -> dict:
    run_dir = out / f"{name}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [
        sys.executable, "-m", "sdcli.cli", "train", str(task), f"run_dir={run_dir}", f"train.seed={seed}",
        f"train.threads={threads}", f"eval.retain=[{GENERAL}]", *overrides, "--quiet",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
        return {"name": name, "seed": seed, "error": done.returncode}
    episode = next((run_dir / "episodes").iterdir())
    by_kind = dict(kind_scores(list_episodes(run_dir)))
    meta = json.loads((episode / "episode.json").read_text())
    metrics = [json.loads(line) for line in (episode / "metrics.jsonl").read_text().splitlines()]
    train_seconds = sum(m["time/step_s"] for m in metrics)
    sets = meta["eval"]["sets"]
    task_set = next(s for s in sets if s["role"] == "task")
    general = next(s for s in sets if s["name"] == "general_qa")
    drift = meta["eval"].get("drift") or {}
    return {
        "name": name, "seed": seed, "overrides": overrides, "steps": len(metrics),
        # the ceiling is the episode's teacher: the model as the episode began, with the fact in context
        "task": task_set["score"], "teacher": task_set["before"]["teacher_score"], "general": general["score"],
        # world_facts marks its questions -direct / -paraphrase / -situation: where the misses are
        "task_by_kind": dict(zip(KINDS, by_kind[episode.name])) if episode.name in by_kind else None,
        # the held-out demonstrations' answer tokens, teacher-forced without context: finer than six greedy answers
        "answer_nll": task_set.get("answer_nll"), "answer_nll_before": task_set["before"].get("answer_nll"),
        # with --set eval.samples=N: the share of N answers per question at temperature 1 that are right
        "sampled": task_set.get("sampled_score"), "sampled_before": task_set["before"].get("sampled_score"),
        "general_base": general.get("base", {}).get("score"),
        "kl_from_base": drift.get("kl_from_base"), "perplexity": drift.get("perplexity"),
        "base_perplexity": drift.get("base_perplexity"), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=HERE / "continual_facts" / "task1.yaml")
    parser.add_argument("--only", nargs="*", help=f"settings to run (default all): {', '.join(GRID)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every setting")
    args = parser.parse_args()
    names = args.only or list(GRID)
    unknown = [n for n in names if n not in GRID]
    if unknown:
        sys.exit(f"unknown settings {unknown}; known: {', '.join(GRID)}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform_line()}; task {args.task.name}", flush=True)
    header = f"{'setting':<14} {'seed':>4} {'steps':>5} {'task':>5} {'ceiling':>7} {'general':>7} {'(base)':>6} {'ppl':>6} {'base ppl':>8} {'KL':>6} {'ans NLL':>7} {'sampled':>7} {'train s':>7}  by kind (direct/paraphrase/situation)"
    print(header, flush=True)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        for seed in args.seeds:
            row = run_setting(args.task, name, GRID[name] + args.set, seed, args.out, args.threads)
            rows.append(row)
            if "error" in row:
                print(f"{name:<14} {seed:>4} failed (exit {row['error']})", flush=True)
                continue
            print(
                f"{name:<14} {seed:>4} {row['steps']:>5} {row['task']:>5.2f} {fmt(row['teacher']):>7} {row['general']:>7.3f} {fmt(row['general_base']):>6} "
                f"{fmt(row['perplexity']):>6} {fmt(row['base_perplexity']):>8} {fmt(row['kl_from_base'], 3):>6} {fmt(row['answer_nll']):>7} {fmt(row['sampled']):>7} {row['train_seconds']:>7.0f}  {kinds(row['task_by_kind'])}",
                flush=True,
            )
            (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def kinds(by_kind: dict | None) -> str:
    return "-" if not by_kind else " / ".join(fmt(by_kind[k]) for k in KINDS)


def platform_line() -> str:
    import os

    from machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
