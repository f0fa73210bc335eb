"""The peer's number on this machine, now: TRL's experimental SDFTTrainer on the reference setting.

    pip install "trl==1.16.*"          # not a dependency of sd; only this script needs it
    python benchmarks/trl_reference.py --steps 7

Setting (the same as benchmarks/step_speed.py): the built-in SmolLM2-135M-Instruct, fp32, 2 threads,
LoRA r=16 on all linear layers, 4 prompts x 1 sample, at most 48 new tokens, the quickstart facts.
TRL's own defaults otherwise. Machines like this one drift by 20% between runs, so run this
right before or after step_speed.py and compare the two, not numbers from different hours.
Prints seconds per step (first step excluded) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON line, for benchmarks/side_by_side.py")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from sdcli.models.builtin_model import ensure_builtin_model

    torch.set_num_threads(int(os.environ.get("SD_BENCH_THREADS", "2")))
    path = ensure_builtin_model()
    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "facts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["demonstration"]} for r in rows] * 50
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.lengths: list[float] = []  # mean completion tokens per step, as TRL logs them

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SDFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=4, num_generations=1,
            max_completion_length=48, learning_rate=5e-4, logging_steps=1, report_to=[], use_cpu=True,
            bf16=False, save_strategy="no", temperature=1.0,
        )
        trainer = SDFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(path),
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        trainer.train()
    timed = timer.times[args.warmup:] or timer.times
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        lengths = timer.lengths[args.warmup:] or timer.lengths
        tokens = [n * 4 / t for n, t in zip(lengths, timed)]  # 4 prompts x 1 completion per step
        print(json.dumps({"s_per_step": statistics.mean(timed), "tokens_per_s": statistics.mean(tokens) if tokens else None,
                          "process_peak_rss_mb": peak_mb, "steps_timed": len(timed)}))
        return
    print(f"TRL SDFTTrainer: {statistics.mean(timed):.2f} s/step over {len(timed)} steps "
          f"(gradient_checkpointing={config.gradient_checkpointing}, distillation_mode={config.distillation_mode})")
    print(f"peak RSS, process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
