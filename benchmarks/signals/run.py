"""Signals: does one episode of rewards, feedback or interactions change behaviour on held-out prompts?

    python benchmarks/signals/run.py --signal rewards                 # 3 seeds (0 1 2), full
    python benchmarks/signals/run.py --signal interactions --seeds 0  # offline and online, one seed
    python benchmarks/signals/run.py --signal feedback --smoke        # 2 steps, short eval: a check, not a result
    python benchmarks/signals/run.py --signal rewards train.lr=2e-4   # extra key=value overrides

For each seed (and, for interactions, each mode: offline, then online with the user simulator)
the runner trains one episode of the signal's recipe (benchmarks/signals/*.yaml: the product
defaults plus what the task needs) from the bare SmolLM2-135M-Instruct with `sd train`, as a
subprocess, and reads the episode's own evaluation (episode.json and eval.json):

- held-out behaviour before and after: "before" is the eval's baseline (`eval.baselines`: the bare
  base, greedy), "after" the trained episode. rewards: share of new word problems answered right
  (numeric); feedback: share of new functions whose greedy code passes every test (sd's sandbox);
  interactions: mean answer length in words on new questions (the users asked for shorter
  answers) and the share that still contains the answer;
- the teacher's ceiling, once per invocation (the base is the same for every seed) with
  `sd eval RUN --no-adapters`: rewards and feedback, the base with a correct answer in its prompt
  (each held-out line's `demonstration`); interactions, the base asked with "Too long" as
  hindsight (the teacher's view, `interactions_heldout_hindsight.jsonl`);
- general questions (benchmarks/continual_facts/data/general_qa.jsonl, 40) before and after;
- wall-clock of the whole `sd train` call, and of its training steps.

Over seeds: the mean and the spread (sample standard deviation) of each number, and a paired
comparison: per held-out item, (after - before) summed over seeds; how many items went up, down
or stayed, and an exact two-sided sign test over the items that moved, so that a gain can be
told from seed noise. Results go to OUT/results.json (default OUT: runs/signals/<signal>).

Budget: each full run (all its seeds; for interactions both modes) is sized for at most 20 minutes
on 2 CPU cores, from the step times of one --smoke run each (2026-11-29, AMD EPYC): rewards ~19 s
a step, feedback ~50 s at 4 prompts and ~28 s at the recipe's 2, interactions ~11 s offline and ~20 s
online, plus 1.5-2 minutes of model loading and evaluation per episode. The fit is estimated, not
yet checked by a full run. Run nothing else on those cores meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


@dataclass(frozen=True)
class Signal:
    settings: dict[str, Path]  # setting name -> recipe
    metric: str  # what the held-out score is, in words
    # The teacher's ceiling, scored once per invocation with `sd eval --no-adapters` (the base is the
    # same for every seed): a set and whether the ceiling is its teacher score (the base with the
    # line's demonstration in context) or its plain score (a set that is itself the teacher's view).
    ceiling_set: Path
    ceiling_is_teacher_score: bool = True
    words: bool = False  # interactions: the users asked for shorter answers, so length is measured


SIGNALS: dict[str, Signal] = {
    "rewards": Signal({"rewards": HERE / "rewards.yaml"}, "word problems right", HERE / "data" / "rewards_heldout.jsonl"),
    "feedback": Signal({"feedback": HERE / "feedback.yaml"}, "functions passing every test",
                       HERE / "data" / "feedback_heldout.jsonl"),
    "interactions": Signal(
        {"offline": HERE / "interactions_offline.yaml", "online": HERE / "interactions_online.yaml"},
        "answers that still contain the answer", HERE / "data" / "interactions_heldout_hindsight.jsonl",
        ceiling_is_teacher_score=False, words=True,
    ),
}
GENERAL = "general_qa"
SMOKE = ["train.max_steps=2", "eval.max_new_tokens=16"]


# ---------------------------------------------------------------------------------------------
# Pure summaries (tested without a model)


def mean_words(responses: list[str]) -> float | None:
    return sum(len(r.split()) for r in responses) / len(responses) if responses else None


def spread(values: list[float | None]) -> dict:
    """{mean, sd, n} of the values that are not None; sd is the sample standard deviation (None for n < 2)."""
    xs = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def sign_test(up: int, down: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven if up and down were equally likely."""
    n = up + down
    if n == 0:
        return 1.0
    k = min(up, down)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(per_seed: list[dict[str, tuple[float, float]]]) -> dict:
    """per_seed: one {item id: (before, after)} per seed. Per item, (after - before) summed over
    seeds; then how many items went up, down or stayed, and the sign test over the moved ones."""
    items = sorted({i for seed in per_seed for i in seed})
    diff = {i: sum(seed[i][1] - seed[i][0] for seed in per_seed if i in seed) for i in items}
    up = sum(d > 1e-9 for d in diff.values())
    down = sum(d < -1e-9 for d in diff.values())
    seeds = len(per_seed)
    return {
        "items": len(items), "seeds": seeds, "up": up, "down": down, "same": len(items) - up - down,
        "mean_diff_per_item_and_seed": sum(diff.values()) / (len(items) * seeds) if items and seeds else None,
        "sign_test_p": sign_test(up, down), "per_item": diff,
    }


# ---------------------------------------------------------------------------------------------
# One episode


def train(recipe: Path, run_dir: Path, seed: int, threads: int, extra: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "sdcli.cli", "train", str(recipe), f"run_dir={run_dir}", f"train.seed={seed}",
               f"train.threads={threads}", *extra, "--quiet"]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    return time.perf_counter() - started, done


def read_episode(run_dir: Path, signal: Signal) -> dict:
    """The numbers of one trained episode, from its episode.json, eval.json and metrics.jsonl."""
    (episode,) = sorted((run_dir / "episodes").iterdir())
    meta = json.loads((episode / "episode.json").read_text())
    if "error" in meta.get("eval", {}):
        raise RuntimeError(f"{episode}: the episode's eval failed: {meta['eval']['error']}")
    details = json.loads((episode / "eval.json").read_text())["sets"]
    metrics = [json.loads(line) for line in (episode / "metrics.jsonl").read_text().splitlines()]

    def rows(role: str, model: str, name: str | None = None) -> dict:
        found = [d for d in details if d["role"] == role and d["model"] == model and (name is None or d["name"] == name)]
        if len(found) != 1:
            raise RuntimeError(f"{episode}/eval.json: expected one {role} set scored '{model}'"
                               + (f" named {name}" if name else "") + f", found {len(found)}")
        return found[0]

    task_after, task_before = rows("task", "after"), rows("task", "before")  # the first episode: before = the bare base
    general_after, general_before = rows("retain", "after", GENERAL), rows("retain", "base", GENERAL)
    out = {
        "episode": str(episode),
        "steps": len(metrics),
        "train_seconds": round(sum(m.get("time/step_s", 0.0) for m in metrics), 1),
        "eval_seconds": meta["eval"].get("seconds"),
        "heldout": {"before": task_before["score"], "after": task_after["score"], "n": task_after["n"]},
        "general": {"before": general_before["score"], "after": general_after["score"], "n": general_after["n"]},
        "items": {x["id"]: {"before": b["score"], "after": x["score"], "response_after": x["response"],
                            "response_before": b["response"]}
                  for x, b in zip(task_after["examples"], task_before["examples"], strict=True)},
        "reward_mean": statistics.fmean(m["signal/reward_mean"] for m in metrics if m.get("signal/reward_mean") is not None)
        if any(m.get("signal/reward_mean") is not None for m in metrics) else None,
        "masked_fraction": statistics.fmean(m["signal/masked_fraction"] for m in metrics if "signal/masked_fraction" in m)
        if any("signal/masked_fraction" in m for m in metrics) else None,
    }
    if signal.words:
        out["words"] = {"before": mean_words([x["response"] for x in task_before["examples"]]),
                        "after": mean_words([x["response"] for x in task_after["examples"]])}
    return out


def eval_max_new_tokens(recipe: Path, overrides: list[str]) -> int:
    """eval.max_new_tokens as the episode used it: the recipe's, or the last override of it."""
    import yaml

    value = yaml.safe_load(recipe.read_text())["eval"].get("max_new_tokens", 48)
    for o in overrides:
        if o.startswith("eval.max_new_tokens="):
            value = int(o.split("=", 1)[1])
    return int(value)


def ceiling(signal: Signal, run_dir: Path, max_new_tokens: int, out: Path) -> dict:
    """The teacher's ceiling: the bare base (`sd eval RUN --no-adapters`) on the signal's ceiling set."""
    command = [sys.executable, "-m", "sdcli.cli", "eval", str(run_dir), "--no-adapters", "--data", str(signal.ceiling_set),
               "--max-new-tokens", str(max_new_tokens), "--out", str(out),
               *([] if signal.ceiling_is_teacher_score else ["--no-teacher"])]
    print("$ " + " ".join(command), flush=True)
    out.unlink(missing_ok=True)  # an earlier invocation's
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], sep="\n", flush=True)
        return {"error": f"sd eval exit {done.returncode}"}
    (result,) = json.loads(out.read_text())["sets"]
    if signal.ceiling_is_teacher_score:
        responses = [x["teacher_response"] for x in result["examples"] if "teacher_response" in x]
        score, n = result["teacher_score"], result["teacher_n"]
    else:
        responses = [x["response"] for x in result["examples"]]
        score, n = result["score"], result["n"]
    return {"score": score, "n": n, "words": mean_words(responses), "set": str(signal.ceiling_set.relative_to(REPO)),
            "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------
# Over seeds


def summarise(signal: Signal, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    summary = {
        "heldout_before": spread([r["heldout"]["before"] for r in ok]),
        "heldout_after": spread([r["heldout"]["after"] for r in ok]),
        "heldout_gain": spread([r["heldout"]["after"] - r["heldout"]["before"] for r in ok]),
        "general_before": spread([r["general"]["before"] for r in ok]),
        "general_after": spread([r["general"]["after"] for r in ok]),
        "seconds": spread([r["seconds"] for r in ok]),
        "train_seconds": spread([r["train_seconds"] for r in ok]),
        "paired": paired([{i: (x["before"], x["after"]) for i, x in r["items"].items()} for r in ok]),
    }
    if signal.words:
        summary["words_before"] = spread([r["words"]["before"] for r in ok])
        summary["words_after"] = spread([r["words"]["after"] for r in ok])
        summary["paired_words"] = paired([
            {i: (len(x["response_before"].split()), len(x["response_after"].split())) for i, x in r["items"].items()}
            for r in ok
        ])
    return summary


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_spread(s: dict, digits: int = 2) -> str:
    return fmt(s["mean"], digits) + ("" if s["sd"] is None else f" ± {fmt(s['sd'], digits)}")


def print_setting(name: str, signal: Signal, runs: list[dict], summary: dict, ceiling: dict | None) -> None:
    words = signal.words
    header = ["seed", "steps", "held-out before", "after", *(["words before", "after"] if words else []),
              "general before", "after", "train min", "total min"]
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([str(r["seed"]), f"failed: {r['error']}"])
            continue
        rows.append([str(r["seed"]), str(r["steps"]), fmt(r["heldout"]["before"]), fmt(r["heldout"]["after"]),
                     *([fmt(r["words"]["before"], 1), fmt(r["words"]["after"], 1)] if words else []),
                     fmt(r["general"]["before"]), fmt(r["general"]["after"]),
                     f"{r['train_seconds'] / 60:.1f}", f"{r['seconds'] / 60:.1f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows if i < len(row))) for i, h in enumerate(header)]
    print(f"\n[{name}] held-out: {signal.metric}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    s = summary
    c = ceiling or {}
    print(f"[{name}] over {s['heldout_after']['n']} seed(s): held-out {fmt_spread(s['heldout_before'])} -> "
          f"{fmt_spread(s['heldout_after'])} (gain {fmt_spread(s['heldout_gain'])}; teacher's ceiling {fmt(c.get('score'))}); "
          + (f"words {fmt_spread(s['words_before'], 1)} -> {fmt_spread(s['words_after'], 1)} "
             f"(teacher {fmt(c.get('words'), 1)}); " if words else "")
          + f"general {fmt_spread(s['general_before'])} -> {fmt_spread(s['general_after'])}; "
          f"{fmt_spread(s['seconds'], 0)} s per episode")
    lines = [("held-out score", s["paired"])] + ([("answer words", s["paired_words"])] if words else [])
    for what, p in lines:
        print(f"[{name}] paired, {what}: of {p['items']} items (after - before, summed over {p['seeds']} seed(s)) "
              f"{p['up']} up, {p['down']} down, {p['same']} same; mean change {fmt(p['mean_diff_per_item_and_seed'], 3)} "
              f"per item and seed; sign test p = {fmt(p['sign_test_p'], 3)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", required=True, choices=list(SIGNALS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (with --smoke: 0)")
    parser.add_argument("--smoke", action="store_true", help=f"a quick check of the harness: {' '.join(SMOKE)}")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/signals/<signal> (runs/signals-smoke/... with --smoke)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    parser.add_argument("--force", action="store_true", help="Delete earlier runs in --out first")
    parser.add_argument("overrides", nargs="*", help="Extra key=value recipe overrides, e.g. train.lr=2e-4")
    args = parser.parse_args()

    signal = SIGNALS[args.signal]
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    out = args.out or REPO / "runs" / ("signals-smoke" if args.smoke else "signals") / args.signal
    extra = (SMOKE if args.smoke else []) + args.overrides
    for name in signal.settings:
        for seed in seeds:
            if (out / f"{name}-s{seed}").exists():
                if not args.force:
                    sys.exit(f"{out / f'{name}-s{seed}'} exists; pass --force to replace it (an episode would stack on it)")
                shutil.rmtree(out / f"{name}-s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    from machine import cpu_name  # benchmarks/machine.py, beside this folder

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} threads"
    print(f"# {started}, {machine}; signal {args.signal}, seeds {seeds}{', smoke' if args.smoke else ''}", flush=True)
    results = {"signal": args.signal, "started": started, "machine": machine, "python": platform.python_version(),
               "smoke": args.smoke, "seeds": seeds, "overrides": extra, "settings": {}}
    for name, recipe in signal.settings.items():
        runs = []
        for seed in seeds:
            run_dir = out / f"{name}-s{seed}"
            seconds, done = train(recipe, run_dir, seed, args.threads, extra)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-3000:], sep="\n", flush=True)
                runs.append({"seed": seed, "error": f"sd train exit {done.returncode}", "seconds": round(seconds, 1)})
                continue
            runs.append({"seed": seed, "run_dir": str(run_dir), "seconds": round(seconds, 1), **read_episode(run_dir, signal)})
            if "ceiling" not in results:
                results["ceiling"] = ceiling(signal, run_dir, eval_max_new_tokens(recipe, extra), out / "ceiling.json")
            r = runs[-1]
            print(f"[{name}] seed {seed}: held-out {fmt(r['heldout']['before'])} -> {fmt(r['heldout']['after'])}, "
                  f"general {fmt(r['general']['before'])} -> {fmt(r['general']['after'])}, {seconds:.0f} s", flush=True)
        summary = summarise(signal, runs)
        results["settings"][name] = {"recipe": str(recipe.relative_to(REPO)), "runs": runs, "summary": summary}
        print_setting(name, signal, runs, summary, results.get("ceiling"))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'results.json'}")
    if "error" in results.get("ceiling", {}) or any("error" in r for s in results["settings"].values() for r in s["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # for benchmarks/machine.py
    main()
