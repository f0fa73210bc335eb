"""Memory and time to load a training data file, by size. Prints numbers; asserts nothing.

    python benchmarks/data_memory.py                                   # 100k and 1M lines, both signals
    python benchmarks/data_memory.py --lines 200000 --signal interactions

Each file is generated into a temporary folder (deleted afterwards) and loaded in a process of its
own, so that its peak RSS belongs to that load alone. "held" is the RSS the loaded report keeps
after a garbage collection, above what the process had before loading (the imports); "peak" is the
process's peak RSS above the same baseline. "access" is the mean time to get one example back
(`report.examples[i]`, random i), which training does a few times per step.

Measured on the shared 2-core development machine (times vary by +-50% with its load), before
(examples held as parsed objects) and after (an index of the lines, `sdcli.core.data.LazyRecords`):

    signal          lines   MB file   before: held MB  load s   after: held MB  load s  access us
    demonstrations  100k         98             215      1.1             1.2     1.0        33
    demonstrations  1M          979            2154     31.7            11.8     9.7        32
    interactions    100k        110             554     17.1             3.0     3.3        48
    interactions    1M         1102            5545     89.1            30.5    30.7        50
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a model answer question capital river city number list seven blue quickly under".split()


def sentence(rng: random.Random, words: int) -> str:
    # drawn from a small pool per length: writing a million lines word by word takes minutes
    if words not in POOLS:
        POOLS[words] = [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() for _ in range(200)]
    pool = POOLS[words]
    return f"{rng.choice(pool)} {rng.randrange(10**6)}."


POOLS: dict[int, list[str]] = {}


def demonstration_line(i: int, rng: random.Random) -> dict:
    # ~1 KB a line: a question and a paragraph-long answer, as in a small SFT set
    return {"prompt": f"Question {i}: " + sentence(rng, 20), "demonstration": sentence(rng, 140)}


def interaction_line(i: int, rng: random.Random) -> dict:
    # two examples a line: two answers, each followed by the user's correction
    turns = [("system", "Be brief."), ("user", sentence(rng, 20)), ("assistant", sentence(rng, 60)),
             ("user", "No, I meant " + sentence(rng, 10)), ("assistant", sentence(rng, 40)),
             ("user", "That is wrong: " + sentence(rng, 10))]
    return {"id": f"conv-{i}", "messages": [{"role": r, "content": c} for r, c in turns]}


MAKERS = {"demonstrations": demonstration_line, "interactions": interaction_line}


def write_file(path: Path, signal: str, lines: int) -> None:
    rng = random.Random(0)
    make = MAKERS[signal]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(json.dumps(make(i, rng)) + "\n")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(signal: str, path: str) -> None:
    """Load `path` and print one JSON line of measurements."""
    from sdcli.recipe.signal_sections import InteractionsSignal, DemonstrationsSignal
    from sdcli.signals import build_signal

    cfg = InteractionsSignal(mode="offline") if signal == "interactions" else DemonstrationsSignal()
    builder = build_signal(cfg)
    gc.collect()
    base = rss_mb()
    start = time.perf_counter()
    report = builder.load(Path(path))
    load_s = time.perf_counter() - start
    gc.collect()
    held = rss_mb() - base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    rng = random.Random(0)
    picks = [rng.randrange(len(report.examples)) for _ in range(2000)]
    start = time.perf_counter()
    for i in picks:
        report.examples[i]
    access_us = (time.perf_counter() - start) / len(picks) * 1e6
    print(json.dumps({"examples": len(report.examples), "load_s": load_s, "held_mb": held, "peak_mb": peak,
                      "access_us": access_us}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--signal", choices=sorted(MAKERS), nargs="+", default=sorted(MAKERS))
    parser.add_argument("--child", nargs=2, metavar=("SIGNAL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"{'signal':<15}{'lines':>10}{'MB file':>9}{'examples':>10}{'load s':>8}{'held MB':>9}"
          f"{'B/line':>8}{'peak MB':>9}{'access us':>11}")
    for signal in args.signal:
        for lines in args.lines:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{signal}.jsonl"
                write_file(path, signal, lines)
                size = path.stat().st_size / 2**20
                done = subprocess.run([sys.executable, __file__, "--child", signal, str(path)], env=env,
                                      capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"loading {lines} {signal} lines failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{signal:<15}{lines:>10}{size:>9.0f}{r['examples']:>10}{r['load_s']:>8.1f}{r['held_mb']:>9.1f}"
                  f"{r['held_mb'] * 2**20 / lines:>8.0f}{r['peak_mb']:>9.1f}{r['access_us']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
