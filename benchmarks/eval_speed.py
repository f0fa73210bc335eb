"""Greedy eval answers on a CPU: sd's direct decoding against `generate`, interleaved in one process.

    python benchmarks/eval_speed.py RUN_DIR            # a trained run: its whole stack answers
    python benchmarks/eval_speed.py                    # the bare built-in model (its answers run longer)
    python benchmarks/eval_speed.py RUN_DIR --rounds 3 --sets a.jsonl b.jsonl

The evaluation after an episode answers every eval set greedily (sdcli/evaluation/scoring.py). On a
CPU a Llama-family model now decodes through sdcli/models/direct_decode.py with its adapters folded,
32 prompts at a time, and a row leaves the batch once a quarter of the batch has stopped. This times
that against what it replaced, `generate` on the folded model 16 prompts at a time (each batch
running until its longest answer ends), on the questions of world_facts task 1 and 2 and the forty
general questions (76 prompts, 40 new tokens at most, as the benchmarks' recipes ask). Order per
round: A B B A. Prints each round's seconds and whether the two gave the same answers; asserts
nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
SETS = [HERE / "world_facts" / "data" / "task1_korravel_eval.jsonl",
        HERE / "world_facts" / "data" / "task2_lumenacoustics_eval.jsonl",
        HERE / "continual_facts" / "data" / "general_qa.jsonl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", default=None, help="a trained run (default: the bare built-in model)")
    parser.add_argument("--sets", type=Path, nargs="+", default=SETS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    args = parser.parse_args()

    import sdcli.models.rollout as rollout
    from sdcli.evaluation.eval_sets import load_eval_set
    from sdcli.evaluation.scoring import greedy_answers
    from sdcli.models.sequences import PromptEncoder
    from sdcli.models.source import load_source
    from sdcli.models.stack import adapter_name

    torch.set_num_threads(args.threads)
    if args.run_dir is not None:
        loaded = load_source(args.run_dir)
        model, tokenizer = loaded.model, loaded.tokenizer
        adapters = [adapter_name(e.number) for e in loaded.episodes]
        what = f"{args.run_dir} ({len(adapters)} adapter(s))"
    else:
        from sdcli.models.model import load_base
        from sdcli.recipe.sections import ModelConfig

        loaded = load_base(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
        model, tokenizer, adapters, what = loaded.model, loaded.tokenizer, None, "the bare built-in model"
    prompts = [ex.prompt for path in args.sets for ex in load_eval_set(path, "contains", [path.parent]).examples]
    common = dict(encoder=PromptEncoder(tokenizer, 512), max_new_tokens=args.max_new_tokens, adapters=adapters, merge=True)
    direct = rollout.supports_direct_decoding

    def answer(name: str) -> list[str]:
        rollout.supports_direct_decoding = direct if name == "direct" else (lambda model, length: False)
        try:
            return greedy_answers(model, tokenizer, prompts, batch_size=None if name == "direct" else 16, **common)
        finally:
            rollout.supports_direct_decoding = direct

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {args.threads} threads; {len(prompts)} prompts, "
          f"<= {args.max_new_tokens} new tokens, {what}; direct = sd's steps at 32 rows, generate = 16 rows")
    ratios = []
    for r in range(args.rounds):
        seconds, answers = {"direct": [], "generate": []}, {}
        for name in ("direct", "generate", "generate", "direct"):
            start = time.perf_counter()
            answers[name] = answer(name)
            seconds[name].append(time.perf_counter() - start)
        d, g = statistics.mean(seconds["direct"]), statistics.mean(seconds["generate"])
        same = sum(a == b for a, b in zip(answers["direct"], answers["generate"]))
        ratios.append(g / d)
        print(f"round {r + 1}: direct {d:.1f} s, generate {g:.1f} s, generate/direct {g / d:.2f}; "
              f"the same answer on {same} of {len(prompts)}", flush=True)
    print(f"median generate/direct {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
