"""sd against the peer (TRL's experimental SDFTTrainer), interleaved in one session.

    pip install "trl==1.16.*"                       # the peer; not a dependency of sd
    python benchmarks/side_by_side.py --rounds 3    # peer, sd, sd, peer, peer, sd: about 8 minutes
    python benchmarks/side_by_side.py --rounds 3 rollout.merge_for_generation=never   # an sd variant

The reference setting, for both: the built-in SmolLM2-135M-Instruct, fp32, SD_BENCH_THREADS (2)
threads, LoRA r=16 on every linear layer, 4 prompts x 1 sample, at most 48 new tokens, the
quickstart facts, on-policy (sd with rollout.off_policy_fraction=0 and no anchors, the step TRL
takes); each tool's own defaults otherwise. Each run is its own process
(benchmarks/trl_reference.py and benchmarks/step_speed.py with --json), so peak RSS is that run's.

These machines drift by about 20% from one hour to the next, so a number is only ever compared
with its neighbour: the order alternates (ABBA...) so that a slow minute hits both, and the
ratios are computed per round. Prints each run, then the median and the range of the per-round
ratios. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: this folder is on sys.path when run as a script

HERE = Path(__file__).resolve().parent


def run(tool: str, steps: int, overrides: list[str]) -> dict:
    script = HERE / ("trl_reference.py" if tool == "peer" else "step_speed.py")
    command = [sys.executable, str(script), "--json", "--steps", str(steps), *(overrides if tool == "sd" else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tool} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for sd, key=value")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="steps per run; the first is not timed")
    args = parser.parse_args()

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {os.cpu_count()} cores, "
          f"{os.environ.get('SD_BENCH_THREADS', '2')} threads, {args.steps} steps per run", flush=True)
    rounds = []
    for i in range(args.rounds):
        order = ["peer", "sd"] if i % 2 == 0 else ["sd", "peer"]
        results = {}
        for tool in order:
            results[tool] = r = run(tool, args.steps, args.overrides)
            tokens = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
            print(f"round {i + 1} {tool:<5} {r['s_per_step']:6.2f} s/step  {tokens:>6} tokens/s  "
                  f"{r['process_peak_rss_mb']:6.0f} MB peak RSS", flush=True)
        rounds.append(results)

    speed = [r["peer"]["s_per_step"] / r["sd"]["s_per_step"] for r in rounds]
    memory = [r["sd"]["process_peak_rss_mb"] / r["peer"]["process_peak_rss_mb"] for r in rounds]
    tokens = [r["sd"]["tokens_per_s"] / r["peer"]["tokens_per_s"] for r in rounds
              if r["sd"].get("tokens_per_s") and r["peer"].get("tokens_per_s")]
    print(f"\nsd steps/s over the peer's:  {spread(speed)}")
    if tokens:
        print(f"sd tokens/s over the peer's: {spread(tokens)}  (sampled tokens per second of step)")
    print(f"sd peak RSS over the peer's: {spread(memory)}")
    print(f"goal (issue #13): steps/s >= 2.00x at peak RSS <= 1.00x; "
          f"{'met' if statistics.median(speed) >= 2 and statistics.median(memory) <= 1 else 'not met'}")


if __name__ == "__main__":
    main()
