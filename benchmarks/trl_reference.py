"""The peer's number on this machine, now: TRL's experimental SDFTTrainer on the reference setting.

    pip install "trl==1.16.*"          # not a dependency of sd; only this script needs it
    python benchmarks/trl_reference.py --steps 7
    python benchmarks/trl_reference.py --device cuda --prompts 16 --samples 4 --new-tokens 128   # on a GPU

Setting (the same as benchmarks/step_speed.py): the built-in SmolLM2-135M-Instruct, fp32, 2 threads,
LoRA r=16 on all linear layers, 4 prompts x 1 sample, at most 48 new tokens, the quickstart facts.
TRL's own defaults otherwise. Machines like this one drift by 20% between runs, so run this
right before or after step_speed.py and compare the two, not numbers from different hours.
Prints seconds per step (first step excluded) and the process's peak RSS; on CUDA (bf16 where the
GPU has it) also the peak of torch.cuda.max_memory_allocated() from the start of training.
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


def peer_trainer(path: Path, out: str, *, steps: int, prompts: int, samples: int, new_tokens: int, dtype, cuda: bool,
                 callbacks: list, tokenizer=None):
    """TRL's SDFTTrainer on the reference setting: the quickstart facts (the demonstration as
    privileged context), LoRA r=16 on all linear layers, lr 5e-4; TRL's own defaults otherwise."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "facts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(  # enough lines that max_steps, not the data, ends training
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["demonstration"]} for r in rows]
        * max(50, steps * prompts // len(rows) + 1)
    )
    config = SDFTConfig(
        # per_device_train_batch_size counts completions; TRL samples num_generations per prompt
        output_dir=out, max_steps=steps, per_device_train_batch_size=prompts * samples, num_generations=samples,
        max_completion_length=new_tokens, learning_rate=5e-4, logging_steps=1, report_to=[], use_cpu=not cuda,
        bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16, save_strategy="no", temperature=1.0,
    )
    return SDFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
        args=config, train_dataset=dataset, processing_class=tokenizer or AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=callbacks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON line, for benchmarks/side_by_side.py")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and compute; default float32 on cpu, bfloat16 on cuda (float16 without bf16)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=48, help="at most this many new tokens per completion")
    parser.add_argument("--model", help="a local model folder; default the built-in SmolLM2-135M-Instruct")
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from sdcli.models.builtin_model import ensure_builtin_model

    torch.set_num_threads(int(os.environ.get("SD_BENCH_THREADS", "2")))
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no GPU")
    dtype_name = args.dtype or (("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    completions = args.prompts * args.samples
    path = Path(args.model) if args.model else ensure_builtin_model()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.lengths: list[float] = []  # mean completion tokens per step, as TRL logs them

        def on_train_begin(self, *a, **k):
            if cuda:  # the peak of training, as sd's phase peaks are; loading is not counted on either side
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = peer_trainer(path, out, steps=args.steps, prompts=args.prompts, samples=args.samples,
                               new_tokens=args.new_tokens, dtype=dtype, cuda=cuda, callbacks=[timer])
        config = trainer.args
        trainer.train()
    timed = timer.times[args.warmup:] or timer.times
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if args.json:
        lengths = timer.lengths[args.warmup:] or timer.lengths
        tokens = [n * completions / t for n, t in zip(lengths, timed)]  # mean length x completions per step
        print(json.dumps({"s_per_step": statistics.mean(timed), "tokens_per_s": statistics.mean(tokens) if tokens else None,
                          "process_peak_rss_mb": peak_mb, "steps_timed": len(timed), "device": args.device,
                          "dtype": dtype_name, **({"gpu_peak_mb": gpu_peak_mb} if cuda else {})}))
        return
    print(f"TRL SDFTTrainer: {statistics.mean(timed):.2f} s/step over {len(timed)} steps "
          f"(gradient_checkpointing={config.gradient_checkpointing}, distillation_mode={config.distillation_mode})")
    print(f"peak RSS, process: {peak_mb:.0f} MB")
    if cuda:
        print(f"peak GPU allocated, training: {gpu_peak_mb:.0f} MB ({dtype_name})")


if __name__ == "__main__":
    main()
