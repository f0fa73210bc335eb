"""sd's direct decoding steps against transformers' `generate`, interleaved in one process.

    python benchmarks/decode_vs_generate.py                # about 2 minutes on 2 cores
    python benchmarks/decode_vs_generate.py --rounds 8 --prompts 8

On a CPU sd samples from int8 copies of the base (rollout.sample_precision: auto), and for
Llama-family models it computes the decoding steps itself (sdcli/models/direct_decode.py: q/k/v
and gate/up fused into one int8 matmul each, the adapters of each fused group as one pair of
matmuls, a preallocated KV cache, inverse-CDF sampling). This measures that against what it
replaced, `generate` with every base linear shadowed by its int8 copy (`int8_for_sampling`), on
the model training samples from (the built-in SmolLM2-135M-Instruct, fp32, a LoRA adapter of
r=16 on every linear layer, non-zero), the quickstart's held-out prompts, temperature 1 with no
top-k/top-p, and exactly --new-tokens tokens per row (no stop token, so both do the same work).
Order per round: A B B A, so a slow minute hits both. Prints each round's seconds, then the median
and range of the per-round ratio generate / direct. Asserts nothing.

(Until 2026-11-29 sd had another loop of its own, over the model's own modules; measured the same
way it was no faster than `generate` (1.04x from int8 copies), and it was removed. README, "Speed
and memory".)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from machine import cpu_name  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SD_BENCH_THREADS", "2")))
    args = parser.parse_args()

    from transformers import GenerationConfig

    from sdcli.models.direct_decode import direct_decode, supports_direct_decoding
    from sdcli.models.int8_sampling import int8_for_sampling
    from sdcli.models.model import add_trainable_adapter, eval_mode, load_base
    from sdcli.models.sequences import PromptEncoder
    from sdcli.recipe.sections import LoraSettings, ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_base(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    model = add_trainable_adapter(loaded.model, "ep001", LoraSettings(r=16, alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # a trained adapter is not zero
    tokenizer = loaded.tokenizer
    rows = [json.loads(line) for line in (HERE.parent / "recipes" / "data" / "facts_eval.jsonl").read_text().splitlines()]
    encoder = PromptEncoder(tokenizer, 512)
    prompts = [encoder.encode([{"role": "user", "content": rows[i % len(rows)]["prompt"]}]) for i in range(args.prompts)]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert supports_direct_decoding(model, width + args.new_tokens)

    def run_direct() -> int:
        out = direct_decode(model, input_ids, attention, int8=True, max_new_tokens=args.new_tokens, temperature=1.0,
                            top_k=0, top_p=1.0, stop_ids={-1}, pad_id=tokenizer.pad_token_id)
        return out.numel()

    def run_generate() -> int:
        with int8_for_sampling(model, True):
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        return int((out.shape[1] - width) * out.shape[0])

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()}, {args.threads} threads; "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, SmolLM2-135M fp32 + LoRA r=16, int8 base")
    ratios = []
    with torch.no_grad(), eval_mode(model):
        run_direct(), run_generate()  # warm-up: first-call allocations and packing
        for r in range(args.rounds):
            seconds = {"direct": [], "generate": []}
            for name in ("direct", "generate", "generate", "direct"):
                start = time.perf_counter()
                tokens = run_direct() if name == "direct" else run_generate()
                seconds[name].append(time.perf_counter() - start)
                assert tokens == args.prompts * args.new_tokens, (name, tokens)
            d, g = statistics.mean(seconds["direct"]), statistics.mean(seconds["generate"])
            ratios.append(g / d)
            print(f"round {r + 1}: direct {d:.3f} s, generate {g:.3f} s, generate/direct {g / d:.3f}", flush=True)
    print(f"median generate/direct {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; "
          f">1: the direct steps are faster)")


if __name__ == "__main__":
    main()
