"""sd against the peer (TRL's experimental SDFTTrainer), interleaved in one session.

    pip install "trl==1.16.*"                       # the peer; not a dependency of sd
    python benchmarks/side_by_side.py --rounds 3    # peer, sd, sd, peer, peer, sd: about 8 minutes
    python benchmarks/side_by_side.py --rounds 3 rollout.merge_for_generation=never   # an sd variant
    python benchmarks/side_by_side.py --device cuda --prompts 16 --samples 4 --new-tokens 128   # on a GPU

The reference setting, for both: the built-in SmolLM2-135M-Instruct, fp32, SD_BENCH_THREADS (2)
threads, LoRA r=16 on every linear layer, 4 prompts x 1 sample, at most 48 new tokens, the
quickstart facts, on-policy (sd with rollout.off_policy_fraction=0 and no anchors, the step TRL
takes); each tool's own defaults otherwise. Each run is its own process
(benchmarks/trl_reference.py and benchmarks/step_speed.py with --json), so peak RSS is that run's.

These machines drift by about 20% from one hour to the next, so a number is only ever compared
with its neighbour: the order alternates (ABBA...) so that a slow minute hits both, and the
ratios are computed per round. Prints each run, then the median and the range of the per-round
ratios. Asserts nothing.

--device, --dtype, --prompts, --samples, --new-tokens and --model change the setting for both
tools alike. On CUDA the memory compared is torch.cuda.max_memory_allocated() over the training
steps (both sides reset it when training starts), not RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: this folder is on sys.path when run as a script

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    """What both tools run; the defaults are the reference setting."""

    device: str = "cpu"
    dtype: str | None = None  # None: float32 on cpu, bfloat16 on cuda (float16 where the GPU lacks bf16)
    prompts: int = 4
    samples: int = 1
    new_tokens: int = 48
    model: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    recipe: str | None = None  # sd's recipe; None: step_speed.py's default (the quickstart)

    def is_reference(self) -> bool:
        return self == Setting()

    def peer_flags(self) -> list[str]:
        flags = ["--device", self.device, "--prompts", str(self.prompts), "--samples", str(self.samples),
                 "--new-tokens", str(self.new_tokens)]
        return flags + (["--dtype", self.dtype] if self.dtype else []) + (["--model", self.model] if self.model else [])

    def sd_overrides(self) -> list[str]:
        return [f"train.prompts_per_step={self.prompts}", f"rollout.num_samples={self.samples}",
                f"rollout.max_new_tokens={self.new_tokens}", *([f"model.dtype={self.dtype}"] if self.dtype else []),
                *([f"model.name_or_path={self.model}"] if self.model else [])]

    def env(self) -> dict[str, str]:
        # sd trains on a GPU whenever one is visible; a CPU setting hides it from both tools
        return {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if self.device == "cpu" else {})}


def run(tool: str, steps: int, overrides: list[str], setting: Setting = Setting()) -> dict:
    script = HERE / ("trl_reference.py" if tool == "peer" else "step_speed.py")
    recipe = ["--recipe", setting.recipe] if setting.recipe else []
    extra = setting.peer_flags() if tool == "peer" else [*recipe, *setting.sd_overrides(), *overrides]
    command = [sys.executable, str(script), "--json", "--steps", str(steps), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=setting.env())
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed ({' '.join(command[1:])}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"


def memory_of(result: dict) -> float:
    return result["gpu_peak_mb"] if "gpu_peak_mb" in result else result["process_peak_rss_mb"]


def compare(rounds: int, steps: int, overrides: list[str], setting: Setting = Setting(), say=print,
            keep_going=lambda: True) -> dict:
    """Alternate the two tools for `rounds` rounds (fewer if keep_going() turns False between rounds)
    and return every run plus the per-round ratios (sd over the peer) and their medians."""
    memory_name = "peak GPU allocated" if setting.device == "cuda" else "peak RSS"
    runs = []
    for i in range(rounds):
        if i and not keep_going():
            break
        order = ["peer", "sd"] if i % 2 == 0 else ["sd", "peer"]
        results = {}
        for tool in order:
            results[tool] = r = run(tool, steps, overrides, setting)
            tokens = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
            say(f"round {i + 1} {tool:<5} {r['s_per_step']:6.2f} s/step  {tokens:>6} tokens/s  "
                f"{memory_of(r):6.0f} MB {memory_name}")
        runs.append(results)

    ratios = {
        "steps_per_s": [r["peer"]["s_per_step"] / r["sd"]["s_per_step"] for r in runs],
        "tokens_per_s": [r["sd"]["tokens_per_s"] / r["peer"]["tokens_per_s"] for r in runs
                         if r["sd"].get("tokens_per_s") and r["peer"].get("tokens_per_s")],
        "peak_memory": [memory_of(r["sd"]) / memory_of(r["peer"]) for r in runs],
    }
    return {"rounds": runs, "memory": memory_name, "ratios": ratios,
            "median": {k: statistics.median(v) for k, v in ratios.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for sd, key=value")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="steps per run; the first is not timed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="at most this many new tokens per sample")
    parser.add_argument("--model", help="a local model folder for both tools; default the built-in SmolLM2-135M-Instruct")
    args = parser.parse_args()
    setting = Setting(args.device, args.dtype, args.prompts, args.samples, args.new_tokens, args.model)

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {os.cpu_count()} cores, "
          f"{os.environ.get('SD_BENCH_THREADS', '2')} threads, {args.steps} steps per run, {setting}", flush=True)
    try:
        result = compare(args.rounds, args.steps, args.overrides, setting, say=lambda line: print(line, flush=True))
    except RuntimeError as e:
        sys.exit(str(e))
    ratios, memory_name = result["ratios"], result["memory"]
    print(f"\nsd steps/s over the peer's:  {spread(ratios['steps_per_s'])}")
    if ratios["tokens_per_s"]:
        print(f"sd tokens/s over the peer's: {spread(ratios['tokens_per_s'])}  (sampled tokens per second of step)")
    print(f"sd {memory_name} over the peer's: {spread(ratios['peak_memory'])}")
    if setting.is_reference():
        speed, memory = result["median"]["steps_per_s"], result["median"]["peak_memory"]
        print(f"goal (issue #13): steps/s >= 2.00x at peak RSS <= 1.00x; {'met' if speed >= 2 and memory <= 1 else 'not met'}")


if __name__ == "__main__":
    main()
