"""The bare base model's greedy score on each signal benchmark's held-out set (one model load).

    python benchmarks/signals/base_rate.py                       # every set
    python benchmarks/signals/base_rate.py --only rewards        # one signal

Scored exactly as the episode's own eval scores "before" (sd's `evaluate_set`, the recipe's
scorer and answer length), so a base rate measured here is the number the runner reports as
"before". Use it to pick a task's difficulty: neither 0 nor near 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.signals.run import SIGNALS, mean_words  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(SIGNALS), default=list(SIGNALS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from sdcli.evaluation.eval_sets import load_eval_set
    from sdcli.evaluation.scoring import evaluate_set
    from sdcli.models.model import load_base
    from sdcli.models.sequences import PromptEncoder
    from sdcli.recipe.loading import load_recipe
    from sdcli.recipe.sections import ModelConfig
    from sdcli.recipe.signal_sections import DEFAULT_DEMONSTRATION_TEMPLATE

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_base(ModelConfig())
    encoder = PromptEncoder(loaded.tokenizer, 512)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, base model loaded in {time.perf_counter() - started:.0f} s")
    for name in args.only:
        recipe = load_recipe(next(iter(SIGNALS[name].settings.values())))
        paths = list(dict.fromkeys([recipe.eval.path, SIGNALS[name].ceiling_set]))
        for path in paths:
            t = time.perf_counter()
            eval_set = load_eval_set(path, recipe.eval.reward, [REPO, Path(path).parent])
            result = evaluate_set(loaded.model, loaded.tokenizer, eval_set, encoder=encoder,
                                  template=DEFAULT_DEMONSTRATION_TEMPLATE, max_new_tokens=recipe.eval.max_new_tokens)
            right = sum(x["score"] for x in result["examples"])
            line = f"{name:<13} {Path(path).name:<40} {right:.0f} of {result['n']} right ({result['score']:.2f})"
            if result["teacher_n"]:
                line += f", teacher {result['teacher_score']:.2f}"
            line += f", {mean_words([x['response'] for x in result['examples']]):.1f} words/answer, {time.perf_counter() - t:.0f} s"
            print(line, flush=True)
            for x in result["examples"][:3]:
                print("   ", json.dumps(x["response"][:160]))


if __name__ == "__main__":
    main()
