"""Seconds, tokens/s and peak memory per phase of a training step. Prints numbers; asserts nothing.

    python benchmarks/step_speed.py                                  # quickstart, 6 steps (1 warm-up)
    python benchmarks/step_speed.py --steps 11 rollout.merge_for_generation=never
    python benchmarks/step_speed.py --variants                       # int8 vs float sampling, folded vs not, ...
    python benchmarks/step_speed.py --variants --only "float sampling (folded)" --only "int8 sampling"

Each variant runs in its own process so that peak RSS belongs to that variant alone. For the peer
(TRL's SDFTTrainer) on the same setting, run benchmarks/side_by_side.py: it alternates the two in
one session, because numbers from different hours on these machines differ by 20%.

On CUDA (sd trains there whenever a GPU is visible) sd's phase timer brackets each phase by
torch.cuda.synchronize(), so that a phase's queued kernels count in that phase, and the JSON
carries gpu_peak_mb: the largest torch.cuda.max_memory_allocated() of any phase of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # sd from this checkout, installed or not (a lent GPU machine has it only as files)

VARIANTS = {
    "sd default": [],
    "float sampling (folded)": ["rollout.sample_precision=float"],
    "int8 sampling": ["rollout.sample_precision=int8"],
    "float sampling, adapter unfolded": ["rollout.sample_precision=float", "rollout.merge_for_generation=never"],
    "gradient checkpointing on": ["train.gradient_checkpointing=true"],
    "checkpointing half the layers": ["train.gradient_checkpointing=0.5"],
    "unfolded + half checkpointing": ["rollout.sample_precision=float", "rollout.merge_for_generation=never",
                                      "train.gradient_checkpointing=0.5"],
    "logit chunks of 256 positions": ["loss.chunk_tokens=256"],
}


def run_one(recipe: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    import torch

    from sdcli.recipe.loading import load_recipe
    from sdcli.training.train import train_episode

    torch.set_num_threads(int(os.environ.get("SD_BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        recipe_obj = load_recipe(
            recipe,
            [f"run_dir={tmp}", f"train.max_steps={steps}", "rollout.max_new_tokens=48", "train.prompts_per_step=4",
             "rollout.num_samples=1",
             # the reference setting is the on-policy step TRL's SDFTTrainer takes; the defaults'
             # off-policy share and anchors are measured by passing them back as overrides
             "rollout.off_policy_fraction=0", "anchor.prompts_per_step=0",
             # the steps are measured, not the held-out evaluation after them (the peer has none)
             "eval=null", *overrides],
        )
        rows: list[dict] = []
        train_episode(recipe_obj, progress=lambda step, m: rows.append(m))
    timed = rows[warmup:] or rows
    phases = sorted({k[5:-2] for r in timed for k in r if k.startswith("time/") and k != "time/step_s"})
    result = {
        "overrides": overrides,
        "steps_timed": len(timed),
        "s_per_step": statistics.mean(r["time/step_s"] for r in timed),
        "tokens_per_s": statistics.mean(r["speed/tokens_per_s"] for r in timed),
        "rollout_tokens_per_s": statistics.mean(r["rollout/tokens_per_s"] for r in timed),
        "mean_response_tokens": statistics.mean(r["response/mean_tokens"] for r in timed),
        "phase_s": {p: statistics.mean(r.get(f"time/{p}_s", 0.0) for r in timed) for p in phases},
        "phase_peak_mb": {p: max(r.get(f"memory/{p}_peak_mb", 0.0) for r in timed) for p in phases},
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():  # phase peaks are torch.cuda.max_memory_allocated() there, reset per phase
        result["gpu_peak_mb"] = max(result["phase_peak_mb"].values(), default=0.0)
        result["gpu_name"] = torch.cuda.get_device_name()
        result["phases_synchronized"] = True  # sd's PhaseTimer waits for the GPU at both ends of a phase
    return result


def show(name: str, r: dict) -> None:
    print(f"\n== {name}  {' '.join(r['overrides'])}")
    print(f"  seconds/step        {r['s_per_step']:.2f}")
    print(f"  tokens/s (step)     {r['tokens_per_s']:.1f}")
    print(f"  tokens/s (rollout)  {r['rollout_tokens_per_s']:.1f}   mean response {r['mean_response_tokens']:.1f} tokens")
    print(f"  peak RSS, process   {r['process_peak_rss_mb']:.0f} MB   (includes loading)")
    if "gpu_peak_mb" in r:
        print(f"  peak GPU allocated  {r['gpu_peak_mb']:.0f} MB   ({r['gpu_name']}; phase peaks below are GPU too)")
    print(f"  {'phase':<12}{'seconds':>10}{'peak MB':>10}")
    for p, s in r["phase_s"].items():
        print(f"  {p:<12}{s:>10.3f}{r['phase_peak_mb'].get(p, 0):>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", action="store_true", help="run each variant in VARIANTS in its own process")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="with --variants: just these (repeat)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variants:
        for name, extra in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            cmd = [sys.executable, __file__, "--json", "--recipe", args.recipe, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *args.overrides, *extra]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"\n== {name}: failed\n{done.stderr[-2000:]}")
                continue
            show(name, json.loads(done.stdout.strip().splitlines()[-1]))
        return
    result = run_one(args.recipe, args.steps, args.warmup, args.overrides)
    if args.json:
        print(json.dumps(result))
    else:
        show("sd", result)


if __name__ == "__main__":
    main()
