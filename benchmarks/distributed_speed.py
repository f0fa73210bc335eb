"""Seconds per step of one process against two data-parallel ranks on the same CPU cores. Prints
numbers; asserts nothing.

    python benchmarks/distributed_speed.py                      # quickstart model, 5 steps (1 warm-up)
    python benchmarks/distributed_speed.py --steps 8 rollout.max_new_tokens=96

Both runs take the same global batch (the step_speed reference: 4 prompts x 1 sample, 48 new tokens,
on-policy, no anchors) and use the same number of cores:
    1 rank   `sd train ... train.threads=N`, one process with N threads
    N ranks  `torchrun --standalone --nproc_per_node=N -m sdcli train ... train.threads=1`
A rank's step time is rank 0's: its own share of the work plus waiting for the others at the
gradient exchange (`time/sync_s`). Each run is a fresh process tree; loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from machine import cpu_name  # benchmarks/machine.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
REFERENCE = ["rollout.max_new_tokens=48", "train.prompts_per_step=4", "rollout.num_samples=1",
             "rollout.off_policy_fraction=0", "anchor.prompts_per_step=0"]


def recipe_without_eval(recipe: Path, folder: Path) -> Path:
    """The recipe with its data path made absolute and no end-of-episode evaluation (not timed anyway)."""
    spec = yaml.safe_load(recipe.read_text())
    spec.pop("eval", None)
    data = Path(spec["data"]["path"])
    spec["data"]["path"] = str(data if data.is_absolute() else (recipe.parent / data).resolve())
    out = folder / recipe.name
    out.write_text(yaml.safe_dump(spec))
    return out


def run(ranks: int, cores: int, recipe: Path, steps: int, overrides: list[str], folder: Path) -> list[dict]:
    run_dir = folder / f"run-{ranks}"
    args = ["train", str(recipe), "--quiet", f"run_dir={run_dir}", f"train.max_steps={steps}",
            f"train.threads={cores // ranks}", *REFERENCE, *overrides]
    threads = str(cores // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if ranks == 1:
        cmd = [sys.executable, "-m", "sdcli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "sdcli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    [metrics] = (run_dir / "episodes").glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def summary(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:] or rows
    phases = sorted({k[5:-2] for r in timed for k in r if k.startswith("time/") and k != "time/step_s"})
    return {
        "s_per_step": statistics.mean(r["time/step_s"] for r in timed),
        "tokens_per_s": statistics.mean(r["speed/tokens_per_s"] for r in timed),
        "phases": {p: statistics.mean(r.get(f"time/{p}_s", 0.0) for r in timed) for p in phases},
        "steps": len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2, help="cores for each run: N threads in one process, or N ranks")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_without_eval(Path(args.recipe), Path(tmp))
        results = {ranks: summary(run(ranks, args.cores, recipe, args.steps, args.overrides, Path(tmp)), args.warmup)
                   for ranks in (1, args.cores)}

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  {cpu_name()}, {os.cpu_count()} logical CPUs; torch gloo on CPU")
    print(f"{args.recipe}  {' '.join(REFERENCE + args.overrides)}; {results[1]['steps']} timed step(s) after "
          f"{args.warmup} warm-up")
    one, many = results[1], results[args.cores]
    phases = sorted(set(one["phases"]) | set(many["phases"]))
    print(f"\n{'':<28}{'s/step':>8}{'tokens/s':>10}" + "".join(f"{p:>11}" for p in phases))
    for label, r in ((f"1 rank x {args.cores} threads", one), (f"{args.cores} ranks x 1 thread", many)):
        print(f"{label:<28}{r['s_per_step']:>8.2f}{r['tokens_per_s']:>10.1f}"
              + "".join(f"{r['phases'].get(p, 0.0):>11.3f}" for p in phases))
    print(f"\n{args.cores} ranks / 1 rank: {one['s_per_step'] / many['s_per_step']:.2f}x the steps per second "
          "(phase columns: seconds per step, rank 0's own)")


if __name__ == "__main__":
    main()
